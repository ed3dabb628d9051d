"""The `mkd` detector: a small "cloner" student trained to mimic a frozen teacher at several resolutions.

fit: train the student from scratch on the normal images (Adam, full passes) to match the teacher's
maps in direction (cosine over each flattened map) and value (λ·MSE), on every training layer.
predict: image score = the same per-image loss on the scoring layers (the deeper ones); map = guided
backpropagation of that score to the input through the student's ReLUs (the teacher's path with plain
gradients when `teacher_gradient`), greyed, percentile-scaled, min-max normalised, blurred with σ = 4,
then resized to 224×224 for the protocol's pixel metrics.
Defaults are the official MVTec recipe (rohban-lab/Knowledge_Distillation_AD `0c574ae`, notes/baselines.md
section 3) with a VGG-16 teacher; the `quick` preset distils EfficientNet-Lite0 (the offline `lite` backbone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from baselines.mkd.model import CLONER_B, Cloner, distillation_loss, guided_relus, saliency_maps
from ltbench import distributed
from ltbench.detector import IMAGE_SIZE, Prediction, TrainSet
from ltbench.errors import ConfigError
from ltbench.feature_cache import FeatureCache
from ltbench.feature_detector import FeatureDetector, FeatureMeta
from ltbench.training import epoch_seed, optimizer_step


@dataclass(frozen=True)
class MKDConfig:
    """Configuration of MKD; defaults are the official MVTec settings unless noted."""

    # the frozen teacher, a backbone name: torchvision VGG-16 `features` (network.py `Vgg16` L67-90)
    backbone: str = "vgg16"
    # teacher layers the student is trained on, shallow to deep (loss_functions.py L13-14: pool2-pool5)
    teacher_layers: tuple[str, ...] = ("pool2", "pool3", "pool4", "pool5")
    # the subset scored and localised (test_functions.py L33-35, L96-98: pool3-pool5)
    score_layers: tuple[str, ...] = ("pool3", "pool4", "pool5")
    # student conv widths per max-pool stage (network.py cfg 'B', the "cloner")
    student_stages: tuple[tuple[int, ...], ...] = CLONER_B
    # a ReLU between each stage's last conv and its pool (network.py make_layers); needed off for a teacher whose
    # maps are signed (EfficientNet's linear bottleneck outputs), which a ReLU'd student could never match
    student_pool_relu: bool = True
    # the student stage whose pooled output matches each teacher layer (pool2-pool5 = stages 1-4)
    student_taps: tuple[int, ...] = (1, 2, 3, 4)
    input_size: int = 128  # student (and VGG teacher) input side, unnormalised [0, 1] (config mvtec_img_size 128)
    lam: float = 0.5  # λ on the MSE term (config.yaml comment: "mvtec: 0.5, Others: 0.01")
    lr: float = 1e-3  # Adam learning rate (config.yaml learning_rate)
    # full passes over the training set: config num_epochs 601 and train.py loops range(num_epochs + 1)
    epochs: int = 602
    batch_size: int = 64  # config.yaml batch_size
    # the teacher sees the student's unnormalised [0, 1] input at input_size (official: VGG-16 fed the raw 128×128
    # tensor, dataloader.py L71-83); False: the teacher backbone's own input contract (size, normalisation)
    teacher_raw_input: bool = True
    # guided backprop also through the teacher's path (official: the loss's gradient flows through both networks)
    teacher_gradient: bool = True
    blur_sigma: float = 4.0  # gbp_localization: gaussian_filter(sigma=4)
    seed: int = 0  # student init and batch order (the official code does not seed)

    def __post_init__(self) -> None:
        for name in ("teacher_layers", "score_layers", "student_taps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "student_stages", tuple(tuple(int(w) for w in s) for s in self.student_stages))
        problems = []
        if not self.teacher_layers or len(self.student_taps) != len(self.teacher_layers):
            problems.append("teacher_layers must list at least one layer and student_taps one stage per teacher layer")
        if not self.score_layers or not set(self.score_layers) <= set(self.teacher_layers):
            problems.append("score_layers must be a non-empty subset of teacher_layers")
        if any(not s or min(s) < 1 for s in self.student_stages) or not self.student_stages:
            problems.append("student_stages must be non-empty stages of positive widths")
        elif any(not 0 <= tap < len(self.student_stages) for tap in self.student_taps):
            problems.append(f"student_taps must index student_stages (0 to {len(self.student_stages) - 1})")
        if self.input_size < 2 ** len(self.student_stages):
            problems.append(f"input_size {self.input_size} is too small for {len(self.student_stages)} max-pools")
        if self.lam < 0 or self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or not self.blur_sigma > 0:
            problems.append("lam must be >= 0, lr and blur_sigma > 0, epochs and batch_size >= 1")
        if problems:
            raise ConfigError("invalid MKD config: " + "; ".join(problems))


@dataclass(frozen=True)
class MKDMeta(FeatureMeta):
    """What MKD learns about its data in `fit` (saved in config.json)."""

    train_images: int  # training images seen (over all ranks)


class MKD(FeatureDetector):
    """Multiresolution knowledge distillation (Salehi et al., CVPR 2021)."""

    Config: ClassVar[type] = MKDConfig
    Meta: ClassVar[type] = MKDMeta
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the official MVTec recipe: VGG-16 teacher, cloner 'B', 128×128, λ 0.5, 602 passes
        "paper": {"backbone": "vgg16", "epochs": 602},
        # CPU on synth/*: EfficientNet-Lite0 teacher (real ImageNet weights, offline) at strides 8 and 16 (28×28 and
        # 14×14 at 224); a cloner of the official pattern at 56×56, whose two pools give those sizes; scored on the
        # deeper layer, as the official drops its shallowest training layer; no teacher backward (CPU cost)
        "quick": {"backbone": "lite", "teacher_layers": ["block4", "block10"], "score_layers": ["block10"],
                  "student_stages": [[16, 40], [16, 16, 112]], "student_taps": [0, 1], "input_size": 56,
                  "student_pool_relu": False, "epochs": 10, "batch_size": 16, "teacher_raw_input": False,
                  "teacher_gradient": False},
    }

    def build_module(self, meta: MKDMeta) -> nn.Module:
        """The student network (weights from `fit` or `load`)."""
        return Cloner(self.config.student_stages, self.config.student_pool_relu)

    # ------------------------------------------------------------------ teacher and student

    def backbone(self, device: torch.device | str):
        """The teacher backbone; with `teacher_raw_input` its encoder takes the raw input at `input_size`.

        The input contract is part of the encoder's digest, so cached maps of the two contracts never mix.
        """
        backbone = super().backbone(device)
        if self.config.teacher_raw_input:
            backbone.image.pixel_mean, backbone.image.pixel_std = 0.0, 1.0
            backbone.image.input_size = self.config.input_size
        return backbone

    def _teacher_maps(self, images: Tensor, layers: tuple[str, ...], grad: bool = False) -> list[Tensor]:
        """The teacher's maps of `layers` for images (B, 3, 224, 224) in [0, 1], on the teacher's device.

        Without `grad` they come through the feature cache (float16-rounded, computed once per image);
        with `grad` they are computed afresh and differentiable with respect to `images`.
        """
        encoder = self.image_encoder(images.device)
        if not grad:
            maps = FeatureCache(progress=False).encode(encoder, images).maps
            return [maps[name] for name in layers]
        maps, _ = encoder._forward(encoder.preprocess(images))  # differentiable: the encoder only freezes weights
        computed = dict(zip(encoder.layer_names, maps))
        return [computed[name] for name in layers]

    def _student_maps(self, student: nn.Module, images: Tensor, layers: tuple[str, ...]) -> list[Tensor]:
        """The student's maps matching teacher `layers`, for images (B, 3, 224, 224) in [0, 1]."""
        c = self.config
        pixels = images
        if pixels.shape[-1] != c.input_size:  # torchvision Resize (PIL bilinear) of the official loader
            pixels = F.interpolate(pixels, size=(c.input_size, c.input_size), mode="bilinear", align_corners=False,
                                   antialias=True)
        pooled = student(pixels)
        return [pooled[c.student_taps[c.teacher_layers.index(name)]] for name in layers]

    # ------------------------------------------------------------------ training

    def learn(self, train: TrainSet, device: torch.device) -> tuple[nn.Module, MKDMeta]:
        """Train the student to mimic the teacher on the normal images of `train`."""
        c = self.config
        encoder = self.image_encoder(device)
        unknown = [name for name in c.teacher_layers if name not in encoder.layer_names]
        if unknown:
            raise ConfigError(f"teacher {c.backbone!r} has no layer {unknown[0]!r}; it has {list(encoder.layer_names)}")
        meta = MKDMeta(backbone=c.backbone, backbone_digest=encoder.digest, feature_layers=tuple(c.teacher_layers),
                       class_names=tuple(train.class_names), train_images=len(train) * distributed.info().world_size)
        torch.manual_seed(c.seed)
        student = self.build_module(meta).to(device)
        self.loss_history_ = self._train(student, train, device, self.progress(train, meta))
        return student, meta

    def _train(self, student: nn.Module, train: TrainSet, device: torch.device, progress) -> list[float]:
        """Full passes of Adam on the distillation loss; resumes from the checkpoint folder. Returns epoch losses."""
        c = self.config
        optimizer = torch.optim.Adam(student.parameters(), lr=c.lr)  # train.py L40: default betas, no decay
        parts = {"model": student, "optimizer": optimizer}
        saved = progress.restore(parts)
        losses = [float(x) for x in saved["epoch_losses"]] if saved else []
        bar = tqdm(range(len(losses), c.epochs), initial=len(losses), total=c.epochs, desc="mkd train", unit="epoch",
                   disable=not distributed.info().is_main)
        for epoch in bar:
            student.train()
            total, count = 0.0, 0
            for images, _ in train.batches(c.batch_size, shuffle=True, seed=epoch_seed(c.seed, epoch)):
                images = images.to(device)
                with torch.no_grad():
                    teacher = self._teacher_maps(images, c.teacher_layers)
                loss = distillation_loss(self._student_maps(student, images, c.teacher_layers), teacher, c.lam).mean()
                optimizer_step(optimizer, loss, [list(student.parameters())], None)
                total, count = total + loss.item() * len(images), count + len(images)
            summed = distributed.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64))
            losses.append(float(summed[0] / summed[1]))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            progress.save(parts, epoch_losses=list(losses))
        bar.close()
        return losses

    # ------------------------------------------------------------------ inference

    def scores_and_gradients(self, images: Tensor, class_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image scores (B,) and guided-backprop gradients of each score with respect to its input.

        Returns: scores (B,) float32 and gradients (B, 3, S, S) at the teacher's input side S (128 for the raw
        VGG-16 teacher: the input the official saliency is taken on; 224 for `lite`), both on the model's device.
        Images are independent in eval mode, so one backward of the summed scores gives each image's gradient.
        """
        c = self.config
        device = self.check_inputs(images, class_idx)
        self.module_.eval()
        side = self.image_encoder(device).input_size
        pixels = images.to(device, torch.float32)
        if pixels.shape[-1] != side:  # the teacher and the student then both see this tensor unchanged
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        pixels = pixels.detach().requires_grad_(True)
        with guided_relus(self.module_), torch.enable_grad():  # predict may be called under no_grad
            teacher = self._teacher_maps(pixels, c.score_layers, grad=c.teacher_gradient)
            scores = distillation_loss(self._student_maps(self.module_, pixels, c.score_layers), teacher, c.lam)
            (gradients,) = torch.autograd.grad(scores.sum(), pixels)
        return scores.detach(), gradients

    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Image scores (B,) = the distillation loss and anomaly maps (B, 224, 224) from guided backprop."""
        scores, gradients = self.scores_and_gradients(images, class_idx)
        maps = saliency_maps(gradients, self.config.blur_sigma)  # (B, S, S)
        if maps.shape[-1] != IMAGE_SIZE:
            maps = F.interpolate(maps[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[:, 0]
        return Prediction(image_scores=scores.float().cpu(), anomaly_maps=maps.float().cpu())
