"""The `regad` detector: RegAD (Huang et al., ECCV 2022) trained on all classes, tested with 2 support images per class.

The LTAD paper's protocol (Sec. 6, "Baselines"): "RegAD is trained on all classes, instead of its
leave-one-class-out setting ... During testing, we use 2 training examples per class as the support
set"; classes with fewer than 2 training images cannot be scored (N/A, as in the paper's Tab. 3).
fit: one-class training batches (query + K supports, the supports' features averaged), the
symmetric negative-cosine loss with stop-gradient, SGD with the cosine schedule; the last epoch is
kept (the official code picks its checkpoint on the test set). Then, per scorable class,
`support_draws` seeded draws of K training images are kept with the model.
predict: per class and draw, a Gaussian per position over the inverse-warped STN features of the
22·K augmented supports; Mahalanobis map, averaged over the draws, bilinear to 224, Gaussian blur
σ = 4; image score = the map's maximum.
Defaults are the official ones (MediaBrain-SJTU/RegAD `5e2c1f8`; /work/shared/notes/baselines.md section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from baselines.regad.model import RegADNetwork, STNEncoder
from baselines.regad.scoring import (
    PositionGaussian,
    augment_support,
    embedding_concat,
    fit_position_gaussian,
    mahalanobis_map,
)
from baselines.regad.stages import BACKBONES, Stages, backbone_stages, known_backbone
from ltbench import distributed
from ltbench.detector import IMAGE_SIZE, Prediction, TorchDetector, TrainSet
from ltbench.errors import ConfigError, DetectorError
from ltbench.feature_detector import FeatureDetector, seeded_rng, training_images
from ltbench.maps import gaussian_blur
from ltbench.training import TrainingProgress, epoch_seed, local_batch, optimizer_step, training_identity

SUPPORT_PHASE = 1  # `epoch_seed` phase of the support draws: phase 1 + class index (training epochs are phase 0)
MIN_TRAINING_IMAGES = 2  # a query needs another image of its class as support (datasets/mvtec.py L105-107)


@dataclass(frozen=True)
class RegADConfig:
    """Configuration of the RegAD baseline; defaults are the official ones (train.py / test.py argparse) unless noted."""

    # network
    backbone: str = "resnet18"  # trainable backbone cut at strides 4/8/16 (baselines.regad.stages): ResNet-18 (stn.py L277-285)
    normalize_input: bool = False  # normalise images for the backbone; official: no (datasets/mvtec.py L37, commented out)
    # training (train.py L28-38, L70-72, L317-322)
    shot: int = 2  # K: supports per training query and support images per class at test (--shot 2; LTAD paper Sec. 6)
    epochs: int = 50  # --epochs
    batch_size: int = 32  # --batch_size: queries of one class per step
    queries_per_class: int | None = None  # cap on each class's queries per epoch (None: all its images, official)
    lr: float = 1e-4  # --lr, SGD for STN+backbone, encoder and predictor alike
    momentum: float = 0.9  # --momentum
    seed: int = 668  # --seed: model init, pair sampling, support draws
    # testing (test.py L29-37, L134-213)
    support_draws: int = 10  # --inferences: seeded support draws per class; their maps are averaged
    covariance_ridge: float = 0.01  # ε in cov + ε·I (test.py L157)
    blur_sigma: float = 4.0  # gaussian_filter sigma on the 224×224 map (test.py L212)

    def __post_init__(self) -> None:
        problems = []
        if not known_backbone(self.backbone):
            problems.append(f"backbone must be one of {', '.join(BACKBONES)}; got {self.backbone!r}")
        if self.shot < 1 or self.epochs < 1 or self.batch_size < 1 or self.support_draws < 1:
            problems.append("shot, epochs, batch_size and support_draws must be >= 1")
        if self.queries_per_class is not None and self.queries_per_class < 1:
            problems.append(f"queries_per_class must be >= 1 or None; got {self.queries_per_class}")
        if self.lr < 0 or not 0.0 <= self.momentum < 1.0:
            problems.append("lr must be >= 0 and momentum in [0, 1)")
        if self.covariance_ridge <= 0 or self.blur_sigma <= 0:
            problems.append("covariance_ridge and blur_sigma must be > 0")
        if problems:
            raise ConfigError("invalid RegAD config: " + "; ".join(problems))


@dataclass(frozen=True)
class RegADMeta:
    """What RegAD learns about its data in `fit` (saved in config.json)."""

    class_names: tuple[str, ...]  # the split's class order; class_idx indexes it
    class_counts: tuple[int, ...]  # training images per class
    stage_channels: tuple[int, ...]  # channels of the three stages (their sum is the Gaussian's dimension)
    map_sizes: tuple[int, ...]  # side of each stage's map at 224 input
    unscorable_classes: dict[str, str]  # class name → why it cannot be scored (fewer training images than `shot`)


class RegAD(TorchDetector):
    """RegAD: registration-based few-shot anomaly detection, in the LTAD paper's all-classes protocol."""

    Config: ClassVar[type] = RegADConfig
    Meta: ClassVar[type] = RegADMeta
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"backbone": "resnet18", "epochs": 50, "support_draws": 10},  # the official recipe
        # a CPU run on synth/* in minutes: a fine-tuned Lite0 costs ~1 CPU-s per image and step, so each
        # epoch trains on 8 queries per class; one support draw per class
        "quick": {"backbone": "lite", "epochs": 2, "queries_per_class": 8, "support_draws": 1},
    }
    check_inputs = FeatureDetector.check_inputs  # shapes and class range of predict's inputs

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._gaussians: dict[tuple[int, str], list[PositionGaussian]] = {}  # the last class's, per draw

    @property
    def unscorable_classes_(self) -> dict[str, str]:
        """Class name → why this model cannot score it (from `meta_`, so after `fit` and `load`; {} before).

        The same property as `TorchDetector.unscorable_classes_` of the contract change on branch
        `cutpaste`; once that is on main this one goes.
        """
        meta = self.__dict__.get("meta_")
        return dict(getattr(meta, "unscorable_classes", None) or {})

    # ------------------------------------------------------------------ network

    def _network(self, meta: RegADMeta, stages: Stages) -> RegADNetwork:
        self._pixel_mean, self._pixel_std = stages.pixel_mean, stages.pixel_std
        encoder = STNEncoder(stages.modules, stages.channels, meta.map_sizes)
        shape = (len(meta.class_names), self.config.support_draws, self.config.shot)
        return RegADNetwork(encoder, stages.channels[-1], shape, IMAGE_SIZE)

    def build_module(self, meta: RegADMeta) -> RegADNetwork:
        """The network sized by `meta`, without ImageNet weights (`load` restores the trained ones)."""
        return self._network(meta, backbone_stages(self.config.backbone, pretrained=False))

    def _prepare(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → what the backbone takes: as they are (official) or normalised."""
        if not self.config.normalize_input:
            return images
        mean = torch.tensor(self._pixel_mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self._pixel_std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    # ------------------------------------------------------------------ training

    def fit(self, train: TrainSet) -> RegAD:
        """Train on the normal images of `train` (resuming from its checkpoint folder); returns self.

        Randomness comes from `config.seed` alone; the caller's torch generators are left as they were.
        """
        device = torch.device(train.device)
        with seeded_rng(device, self.config.seed):
            self.module_, self.meta_ = self._learn(train, device)
        self.module_.eval()
        self._gaussians = {}
        return self

    def _learn(self, train: TrainSet, device: torch.device) -> tuple[RegADNetwork, RegADMeta]:
        c = self.config
        images, labels = training_images(train)  # (N, 3, 224, 224) uint8, (N,)
        names = tuple(train.class_names)
        counts = torch.bincount(labels, minlength=len(names)).tolist()
        trainable = [k for k, n in enumerate(counts) if n >= MIN_TRAINING_IMAGES]
        if not trainable:
            raise DetectorError(f"RegAD needs a class with at least {MIN_TRAINING_IMAGES} training images to form "
                                f"training pairs; per-class counts are {dict(zip(names, counts))}")
        unscorable = {name: f"{n} training image{'' if n == 1 else 's'}; RegAD needs {c.shot} support images"
                      for name, n in zip(names, counts) if n < c.shot}
        torch.manual_seed(c.seed)
        stages = backbone_stages(c.backbone, pretrained=True)
        meta = RegADMeta(class_names=names, class_counts=tuple(counts), stage_channels=tuple(stages.channels),
                         map_sizes=tuple(IMAGE_SIZE // stride for stride in stages.strides),
                         unscorable_classes=unscorable)
        module = self._network(meta, stages)
        module = module.to(device)
        module.support_images.copy_(self._support_draws(images, labels, meta))
        self.loss_history_ = self._train(module, images, labels, trainable, device,
                                         TrainingProgress(train.checkpoint_dir, training_identity(c, meta)))
        return module, meta

    def _support_draws(self, images: Tensor, labels: Tensor, meta: RegADMeta) -> Tensor:
        """(classes, draws, K, 3, 224, 224) uint8: draw d of class k = K distinct images of k, drawn by a
        generator seeded `epoch_seed(seed, d, SUPPORT_PHASE + k)`; zeros for an unscorable class."""
        c = self.config
        out = torch.zeros(len(meta.class_names), c.support_draws, c.shot, *images.shape[1:], dtype=torch.uint8)
        for k, name in enumerate(meta.class_names):
            if name in meta.unscorable_classes:
                continue
            members = (labels == k).nonzero().flatten()
            for draw in range(c.support_draws):
                generator = torch.Generator().manual_seed(epoch_seed(c.seed, draw, SUPPORT_PHASE + k))
                out[k, draw] = images[members[torch.randperm(len(members), generator=generator)[:c.shot]]]
        return out

    def _train(self, module: RegADNetwork, images: Tensor, labels: Tensor, classes: list[int], device: torch.device,
               progress: TrainingProgress) -> list[float]:
        """SGD on one-class (query, K supports) batches; resumes from the checkpoint folder. Returns epoch losses."""
        c = self.config
        parameters = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=c.lr, momentum=c.momentum)  # = the official 3 SGDs (same settings)
        parts = {"model": module, "optimizer": optimizer}
        saved = progress.restore(parts)
        losses = [float(x) for x in saved["epoch_losses"]] if saved else []
        queries_total = sum(min(int((labels == k).sum()), c.queries_per_class or len(labels)) for k in classes)
        bar = tqdm(range(len(losses), c.epochs), initial=len(losses), total=c.epochs, desc="regad train",
                   unit="epoch", disable=not distributed.info().is_main)
        for epoch in bar:
            # official adjust_learning_rate with epochs counted from 1: the last epoch runs at lr 0
            for group in optimizer.param_groups:
                group["lr"] = c.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch + 1) / c.epochs))
            module.train()
            generator = torch.Generator().manual_seed(epoch_seed(c.seed, epoch))
            total = 0.0
            for queries, supports in pair_batches(labels, classes, c.batch_size, c.shot, generator, c.queries_per_class):
                local = local_batch(torch.arange(len(queries)))
                loss = None
                if len(local.indices):
                    query_images = self._prepare(images[queries[local.indices]].to(device).float().div_(255))
                    support_images = self._prepare(images[supports[local.indices]].to(device).float().div_(255)
                                                   .flatten(0, 1)).unflatten(0, (len(local.indices), c.shot))
                    loss = module.pair_loss(query_images, support_images)
                    total += loss.item() * len(local.indices)
                optimizer_step(optimizer, None if loss is None else loss * local.weight, [parameters], None)
            losses.append(distributed.all_reduce_sum(torch.tensor([total], dtype=torch.float64)).item() / queries_total)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            progress.save(parts, epoch_losses=list(losses))
        bar.close()
        return losses

    # ------------------------------------------------------------------ inference

    def _features(self, images: Tensor) -> Tensor:
        """Images (B, 3, 224, 224) in [0, 1] → the Gaussian's embeddings (B, ΣC, P), P = the first map's positions."""
        _, aligned = self.module_.encoder(self._prepare(images), aligned=True)
        return embedding_concat(aligned).flatten(2)

    def _class_gaussians(self, k: int, device: torch.device) -> list[PositionGaussian]:
        """The Gaussians of class k, one per support draw (kept for the last class asked for)."""
        key = (k, str(device))
        if key not in self._gaussians:
            self._gaussians.clear()  # test images come grouped by class: hold one class at a time
            supports = self.module_.support_images[k].to(device).float().div_(255)  # (draws, K, 3, 224, 224)
            self._gaussians[key] = [
                fit_position_gaussian(self._features(augment_support(draw)), self.config.covariance_ridge)
                for draw in supports
            ]
        return self._gaussians[key]

    @torch.no_grad()
    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Anomaly maps (B, 224, 224) and image scores (B,) = each map's maximum, for images in [0, 1].

        Raises `DetectorError` for an image of a class in `unscorable_classes_`.
        """
        device = self.check_inputs(images, class_idx)
        self.module_.eval()
        for k in class_idx.unique().tolist():
            name = self.meta_.class_names[k]
            if name in self.meta_.unscorable_classes:
                raise DetectorError(f"RegAD cannot score class {name!r}: {self.meta_.unscorable_classes[name]}")
        embeddings = self._features(images.to(device))  # (B, C, P)
        side = self.meta_.map_sizes[0]
        maps = torch.empty(len(images), IMAGE_SIZE, IMAGE_SIZE)
        for k in class_idx.unique().tolist():
            rows = (class_idx == k).nonzero().flatten()
            draws = self._class_gaussians(k, device)
            distance = sum(mahalanobis_map(embeddings[rows.to(device)], g) for g in draws) / len(draws)  # (b, P)
            upsampled = F.interpolate(distance.view(-1, 1, side, side), size=(IMAGE_SIZE, IMAGE_SIZE),
                                      mode="bilinear", align_corners=False)[:, 0]
            maps[rows] = gaussian_blur(upsampled, self.config.blur_sigma).cpu()
        return Prediction(image_scores=maps.flatten(1).max(dim=1).values, anomaly_maps=maps)


def pair_batches(labels: Tensor, classes: list[int], batch_size: int, shot: int, generator: torch.Generator,
                 queries_per_class: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """One epoch of training batches (datasets/mvtec.py `shuffle_dataset` L78-156, DataLoader shuffle).

    Each class's images are shuffled and cut into batches of `batch_size` queries; each query gets
    `shot` supports drawn uniformly, with replacement, from the other images of its class; the
    batches of all classes are then shuffled together.
    Parameters: labels: (N,) class index of each image; classes: the classes to train on (each
    with >= 2 images); generator: the epoch's; queries_per_class: keep only the first that many of
    each class's shuffled images as queries (None: all, as the official code).
    Returns: [(query indices (b,), support indices (b, shot))] into the N images.
    """
    batches = []
    for k in classes:
        members = (labels == k).nonzero().flatten()  # (n,)
        order = torch.randperm(len(members), generator=generator)[:queries_per_class]  # positions in members
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]  # (b,)
            picks = torch.randint(0, len(members) - 1, (len(chosen), shot), generator=generator)
            picks = picks + (picks >= chosen[:, None]).long()  # skip the query itself
            batches.append((members[chosen], members[picks]))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
