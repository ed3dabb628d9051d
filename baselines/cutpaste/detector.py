"""The `cutpaste` detector: Cut & Paste (Li et al., CVPR 2021), detection only.

fit: fine-tune an ImageNet CNN with a projection head to tell normal images from their CutPaste
and Scar augmentations (the 3-way variant), then fit a Gaussian density estimator (GDE:
mean + Ledoit-Wolf precision) to the L2-normalised pooled embeddings of the unaugmented
training images. predict: image score = Mahalanobis distance of the test embedding; no
anomaly map (the paper reports N/A for its segmentation in the LTAD comparison).
There is no official code; the settings follow Runinho/pytorch-cutpaste `10d8bf7`, the
re-implementation the SSPCAB authors used (notes/baselines.md section 2; file:line cited per field).
Its `--epochs` and `--freeze_resnet` count optimisation steps, and so do `steps` and `freeze_steps` here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from baselines.cutpaste.augment import JITTER, color_jitter, cutpaste, scar
from ltbench import distributed
from ltbench.detector import Prediction, TorchDetector, TrainSet
from ltbench.errors import ConfigError, DetectorError
from ltbench.feature_detector import TrainingFeatures, _gather_shards
from ltbench.training import TrainingProgress, epoch_seed, optimizer_step, rank_seed, training_identity

NETWORKS = ("resnet18", "lite")
VARIANTS = {"3way": ("normal", "cutpaste", "scar"), "binary": ("normal", "cutpaste"), "scar": ("normal", "scar")}
DENSITIES = ("global", "per_class")
EMBED_BATCH = 32  # images per forward pass when embedding without gradients


@dataclass(frozen=True)
class CutPasteConfig:
    """Configuration of Cut & Paste; defaults are Runinho/pytorch-cutpaste `10d8bf7` unless noted."""

    # network: "resnet18" = torchvision resnet18(pretrained=True) with fc removed (model.py L11, L28), ImageNet
    # weights from the Hub mirror timm/resnet18.tv_in1k or "resnet18:DIR"; "lite" = EfficientNet-Lite0 (quick preset)
    network: str = "resnet18"
    pretrained: bool = True  # ImageNet initialisation (model.py L11 pretrained=True; the repo's README runs use False)
    width: int = 64  # ResNet stem width: 64 is ResNet-18 (smaller only for tests; ImageNet weights need 64)
    image_size: int = 256  # train and test resize (run_training.py L50-59, eval.py L47-51; paper 256x256)
    head_dims: tuple[int, ...] = (512, 128)  # Linear+BN1d+ReLU widths: [512] * head_layer + [128], head_layer=1
    #                                          (run_training.py L203; model.py L15-30)
    variant: str = "3way"  # normal / cutpaste / scar (run_training.py L206 default; paper's 3-way)
    steps: int = 10000  # optimisation steps (Runinho `--epochs` counts steps, default 256; its README runs 10000);
    #                     0 = the density on the initial network (the untrained control; ImageNet + GDE)
    batch_size: int = 32  # source images per step; the forward batch is 3x (README recommends 32; paper 96 for 3-way)
    lr: float = 0.03  # SGD learning rate (run_training.py L41; paper)
    momentum: float = 0.9  # SGD momentum (run_training.py L41)
    weight_decay: float = 3e-5  # SGD weight decay (run_training.py L41)
    freeze_steps: int = 20  # head-only steps when pretrained; BN statistics still update (run_training.py L77-78,
    #                          L102-103, --freeze_resnet 20 steps; the paper's 20 "epochs" per Runinho's naming)
    jitter: float = JITTER  # ColorJitter strength on the whole image and on the patch (run_training.py L57)
    density: str = "global"  # "global": one Gaussian over all classes (the LTAD paper's pooled setting);
    #                          "per_class": one per class (class index known at test time; notes section 7)
    seed: int = 0  # network head init, batch order and augmentations (Runinho draws unseeded)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_dims", tuple(int(d) for d in self.head_dims))
        problems = []
        if self.network.partition(":")[0] not in NETWORKS:
            problems.append(f"network must be one of {', '.join(NETWORKS)} (resnet18 also as resnet18:DIR); "
                            f"got {self.network!r}")
        if self.network.startswith("lite:"):
            problems.append("lite takes no weights path: its weights come with the efficientnet-lite0 package")
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        if self.density not in DENSITIES:
            problems.append(f"density must be one of {', '.join(DENSITIES)}; got {self.density!r}")
        if self.width < 1 or self.image_size < 32 or not self.head_dims or min(self.head_dims) < 1:
            problems.append("width >= 1, image_size >= 32 and head_dims of positive widths are required")
        if self.steps < 0 or self.batch_size < 1 or self.freeze_steps < 0:
            problems.append("steps and freeze_steps must be >= 0, batch_size >= 1")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0 or self.jitter < 0:
            problems.append("lr must be > 0; momentum, weight_decay and jitter >= 0")
        if problems:
            raise ConfigError("invalid Cut & Paste config: " + "; ".join(problems))


@dataclass(frozen=True)
class CutPasteMeta:
    """What Cut & Paste learns about its data in `fit` (saved in config.json)."""

    class_names: tuple[str, ...]  # the split's classes, in order
    embedding_dim: int  # D of the pooled embedding the Gaussian lives in
    gaussians: int  # 1 (global) or the number of classes (per_class)
    train_images: int  # training images the Gaussian was fitted to (0 before it is)
    unscorable_classes: dict[str, str]  # per_class only: a class with < 2 training images has no covariance


# ----------------------------------------------------------------------------- network


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite0 up to its 1280-channel head, globally averaged (what its ImageNet classifier reads)."""

    def __init__(self, pretrained: bool) -> None:
        super().__init__()
        from ltbench.backbones import load_lite_image_model

        if pretrained:
            net = load_lite_image_model()
        else:
            from efficientnet_lite_pytorch import EfficientNet

            net = EfficientNet.from_name("efficientnet-lite0")
        self.stem, self.bn0, self.blocks = net._conv_stem, net._bn0, net._blocks
        self.head, self.bn1, self.act = net._conv_head, net._bn1, net._swish
        self.dim = net._conv_head.out_channels

    def forward(self, images: Tensor) -> Tensor:
        x = self.act(self.bn0(self.stem((images - 0.5) / 0.5)))  # lite's input contract: (x - 0.5) / 0.5
        for block in self.blocks:  # no drop-connect, as LiteImageEncoder
            x = block(x)
        return self.act(self.bn1(self.head(x))).mean(dim=(2, 3))  # (B, 1280)


class _ResNetTrunk(nn.Module):
    """torchvision-layout ResNet-18 without `fc`: the 512-d global average of layer4 (model.py L11, L28)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        from ltbench.imagenet import resnet18

        self.net = resnet18(width=width)
        del self.net.fc
        self.dim = self.net.stage_channels[-1]

    def forward(self, images: Tensor) -> Tensor:
        from ltbench.imagenet import imagenet_normalize

        last = next(reversed(self.net.forward_features(imagenet_normalize(images)).values()))
        return last.mean(dim=(2, 3))  # (B, 512)


class CutPasteNet(nn.Module):
    """Trunk -> pooled embedding -> projection head -> logits, plus the fitted Gaussians as buffers."""

    def __init__(self, config: CutPasteConfig, gaussians: int) -> None:
        super().__init__()
        self.trunk = _LiteTrunk(False) if config.network == "lite" else _ResNetTrunk(config.width)
        layers: list[nn.Module] = []
        width = self.trunk.dim
        for dim in config.head_dims:  # model.py L15-30: Linear, BatchNorm1d, ReLU per head layer
            layers += [nn.Linear(width, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
            width = dim
        self.head = nn.Sequential(*layers)
        self.out = nn.Linear(width, len(VARIANTS[config.variant]))
        self.register_buffer("gde_mean", torch.zeros(gaussians, self.trunk.dim))  # (G, D)
        self.register_buffer("gde_precision", torch.zeros(gaussians, self.trunk.dim, self.trunk.dim))  # (G, D, D)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, S, S) in [0, 1] -> (pooled embedding (B, D), logits (B, n_variants))."""
        embedding = self.trunk(images)
        return embedding, self.out(self.head(embedding))


def embedding_dim(config: CutPasteConfig) -> int:
    """D of the pooled embedding: 1280 for EfficientNet-Lite0's head, 8 x width for ResNet-18's layer4."""
    return 1280 if config.network == "lite" else 8 * config.width


def resize(images: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), bilinear (the official PIL Resize), unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def augment_batch(images: Tensor, variant: str, jitter: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The training batch of one step: each variant of every source image, grouped by variant.

    Parameters: images: (B, 3, S, S) in [0, 1]. Returns: (inputs (V*B, 3, S, S), labels (V*B,)) with
    labels [0]*B + [1]*B (+ [2]*B) as Runinho's `repeat_interleave` (run_training.py L104-110).
    """
    views: dict[str, list[Tensor]] = {name: [] for name in VARIANTS[variant]}
    for image in images:
        image = color_jitter(image, generator, jitter)  # on the whole image first (run_training.py L57)
        views["normal"].append(image)
        if "cutpaste" in views:
            views["cutpaste"].append(cutpaste(image, generator, jitter).image)
        if "scar" in views:
            views["scar"].append(scar(image, generator, jitter).image)
    inputs = torch.cat([torch.stack(group) for group in views.values()])
    labels = torch.arange(len(views)).repeat_interleave(len(images))
    return inputs, labels


def mahalanobis(embeddings: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """sqrt((f - mu)^T P (f - mu)) per row (density.py L15-51), in float64.

    Parameters: embeddings: (B, D); mean: (D,); precision: (D, D). Returns: (B,) float64.
    """
    delta = embeddings.double() - mean.double()                              # (B, D)
    squared = ((delta @ precision.double()) * delta).sum(dim=1)              # (B,)
    return squared.clamp(min=0.0).sqrt()


def fit_gaussian(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Ledoit-Wolf precision of (N, D) embeddings (sklearn LedoitWolf, as density.py L15-51)."""
    from sklearn.covariance import LedoitWolf

    estimate = LedoitWolf().fit(embeddings)
    return estimate.location_, estimate.precision_


# ----------------------------------------------------------------------------- detector


class CutPaste(TorchDetector):
    """Cut & Paste: self-supervised 3-way classification + Gaussian density on the embedding. Detection only."""

    Config: ClassVar[type] = CutPasteConfig
    Meta: ClassVar[type] = CutPasteMeta
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # ResNet-18 (ImageNet) with Runinho's README recipe: 10,000 steps of 32 source images at 256x256
        "paper": {"network": "resnet18", "pretrained": True, "image_size": 256, "steps": 10000, "batch_size": 32},
        # a CPU run on synth/* in minutes: the offline EfficientNet-Lite0, fine-tuned, at 128x128
        "quick": {"network": "lite", "pretrained": True, "image_size": 128, "steps": 50, "batch_size": 8},
    }

    def build_module(self, meta: CutPasteMeta) -> nn.Module:
        """The network and room for `meta.gaussians` Gaussians; initialised from `config.seed`, no pretrained weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return CutPasteNet(self.config, meta.gaussians)

    def _load_pretrained(self, module: CutPasteNet) -> None:
        arch, colon, source = self.config.network.partition(":")
        if arch == "lite":
            module.trunk = _LiteTrunk(True)
            return
        from ltbench.imagenet import load_imagenet_weights

        load_imagenet_weights(module.trunk.net, source if colon else None, arch)

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised pooled embeddings (B, D) of images (B, 3, H, W) in [0, 1], in eval mode (eval.py L86-87)."""
        self._check_fitted()
        device = next(self.module_.parameters()).device
        with torch.no_grad():
            pooled, _ = self.module_(resize(images.to(device, torch.float32), self.config.image_size))
        return F.normalize(pooled, p=2, dim=1)

    def fit(self, train: TrainSet) -> CutPaste:
        """Fine-tune on the self-supervised task, then fit the Gaussian(s) to the training embeddings."""
        c = self.config
        classes = tuple(train.class_names)
        meta = CutPasteMeta(classes, embedding_dim(c), 1 if c.density == "global" else len(classes), 0, {})
        module = self.build_module(meta)
        if c.pretrained:
            self._load_pretrained(module)
        module.to(train.device)
        self.meta_, self.module_ = meta, module
        self._train(train, module, meta)
        self._fit_density(train)
        return self

    def _train(self, train: TrainSet, module: CutPasteNet, meta: CutPasteMeta) -> None:
        c = self.config
        parameters = [p for p in module.parameters()]
        optimizer = torch.optim.SGD(parameters, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        # CosineAnnealingWarmRestarts(T_0=steps) stepped every step (run_training.py L42, L132-133): one cosine
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=max(1, c.steps))
        progress = TrainingProgress(train.checkpoint_dir, training_identity(c, meta))
        modules = {"module": module, "optimizer": optimizer, "scheduler": scheduler}
        state = progress.restore(modules) or {"step": 0, "passes": 0}
        step, passes = int(state["step"]), int(state["passes"])
        self.loss_history_: list[float] = list(state.get("losses", []))
        module.train()
        bar = tqdm(total=c.steps, initial=step, desc="cutpaste", unit="step", disable=not distributed.info().is_main)
        while step < c.steps:
            noise = torch.Generator().manual_seed(rank_seed(epoch_seed(c.seed, passes, phase=1)))
            for images, _ in train.batches(c.batch_size, shuffle=True, seed=epoch_seed(c.seed, passes)):
                if step >= c.steps:
                    break
                frozen = c.pretrained and step < c.freeze_steps  # head only; BN statistics still update
                for parameter in module.trunk.parameters():
                    parameter.requires_grad_(not frozen)
                inputs, labels = augment_batch(resize(images.float(), c.image_size), c.variant, c.jitter, noise)
                _, logits = module(inputs.to(train.device))
                loss = F.cross_entropy(logits, labels.to(train.device))
                optimizer_step(optimizer, loss, [parameters], grad_clip=None)
                scheduler.step()
                self.loss_history_.append(float(loss.detach()))
                step += 1
                bar.update(1)
            passes += 1
            # saved after each pass (and at the last step): a resumed run replays the next pass from its seeds
            progress.save(modules, step=step, passes=passes, losses=self.loss_history_)
        bar.close()
        module.requires_grad_(True)
        module.eval()

    def _fit_density(self, train: TrainSet) -> None:
        """The Gaussian(s) of the training embeddings, unaugmented, as test images are seen (eval.py L25-38)."""
        embeddings, labels = [], []
        for images, class_idx in train.batches(EMBED_BATCH, shuffle=False):
            embeddings.append(self.embed(images).cpu())
            labels.append(class_idx.cpu().long())
        local = TrainingFeatures([], torch.cat(embeddings), torch.cat(labels))
        if distributed.info().enabled:  # the density needs every rank's images
            local = _gather_shards(local, distributed.gather(local), getattr(train, "total", None))
        features = local.embeddings.double().numpy()  # (N, D)
        class_idx = local.class_idx.numpy()           # (N,)
        names = self.meta_.class_names
        groups = [np.arange(len(features))] if self.config.density == "global" else \
            [np.flatnonzero(class_idx == k) for k in range(len(names))]
        unscorable = {}
        for g, members in enumerate(groups):
            if len(members) < 2:  # no covariance from fewer than two images
                unscorable[names[g]] = (f"{len(members)} training image{'s' * (len(members) != 1)}; "
                                        "a per-class Gaussian needs 2")
                continue
            mean, precision = fit_gaussian(features[members])
            self.module_.gde_mean[g] = torch.from_numpy(mean).float()
            self.module_.gde_precision[g] = torch.from_numpy(precision).float()
        if self.config.density == "global" and unscorable:
            raise DetectorError(f"Cut & Paste needs at least 2 training images; got {len(features)}")
        self.meta_ = replace(self.meta_, train_images=len(features), unscorable_classes=unscorable)

    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Image scores (B,) = Mahalanobis distance of each embedding to its Gaussian; no anomaly maps."""
        self._check_fitted()
        if images.ndim != 4 or images.shape[1] != 3 or class_idx.shape != (images.shape[0],):
            raise DetectorError(f"Cut & Paste expects images (B, 3, H, W) and class_idx (B,); got "
                                f"{tuple(images.shape)} and {tuple(class_idx.shape)}")
        names = self.meta_.class_names
        if int(class_idx.min()) < 0 or int(class_idx.max()) >= len(names):
            raise DetectorError(f"class_idx must lie in [0, {len(names)}); got {class_idx.tolist()}")
        asked = sorted({names[int(k)] for k in class_idx} & set(self.meta_.unscorable_classes))
        if asked:
            raise DetectorError(f"Cut & Paste cannot score {asked}: {self.meta_.unscorable_classes[asked[0]]}")
        embeddings = self.embed(images).cpu()  # (B, D)
        group = torch.zeros_like(class_idx.cpu()) if self.meta_.gaussians == 1 else class_idx.cpu()
        scores = torch.empty(len(images), dtype=torch.float64)
        for g in group.unique().tolist():  # one (D, D) precision at a time, never (B, D, D)
            members = group == g
            scores[members] = mahalanobis(embeddings[members], self.module_.gde_mean[g].cpu(),
                                          self.module_.gde_precision[g].cpu())
        return Prediction(image_scores=scores.float(), anomaly_maps=None)
