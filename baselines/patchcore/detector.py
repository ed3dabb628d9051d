"""The `patchcore` detector: a memory bank of locally aware patch features, scored by nearest neighbours.

fit (no gradient training): encode every training image once through the feature cache (every
rank gets every image: `scope="all"`), turn the layer maps into 1024-d patch features, and keep a
greedy coreset of them per bank: one bank per class (`bank="per_class"`, the default: the class
index is known at test time) or one over all classes (`bank="shared"`).
predict: each patch's score is its squared L2 distance to the nearest bank entry (k = 1); image
score = the largest patch score (the official code, not the paper's Eq. 7 reweighting); map = the
28×28 patch scores bilinearly upsampled to 224×224, then a Gaussian blur with σ = 4.
Defaults are the official IM224 WR50 baseline (amazon-science/patchcore-inspection `fcaa92f`,
sample_training.sh; notes/baselines.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from baselines.patchcore.memory import (
    draw_starts,
    greedy_coreset,
    nearest_distances,
    patch_embeddings,
    random_projection,
)
from ltbench import distributed
from ltbench.detector import Prediction, TrainSet
from ltbench.errors import ConfigError, DetectorError
from ltbench.feature_cache import FeatureCache
from ltbench.feature_detector import FeatureDetector, FeatureMeta, TrainingFeatures, grid_to_image
from ltbench.maps import gaussian_blur

EMBED_ELEMENTS = 1 << 26  # unfolded values held at once while embedding training images (256 MiB of float32)


@dataclass(frozen=True)
class PatchCoreConfig:
    """Configuration of PatchCore; defaults are the official "IM224 WR50 baseline" unless noted."""

    # frozen ImageNet encoder (backbones.py L24: torchvision wide_resnet50_2, V1 weights)
    backbone: str = "wide_resnet50_2"
    # its layers, shallow to deep; the first sets the patch grid (sample_training.sh: -le layer2 -le layer3)
    feature_layers: tuple[str, ...] = ("layer2", "layer3")
    patch_size: int = 3  # local neighbourhood of `Unfold` (run_patchcore.py `--patchsize` 3)
    pretrain_dim: int = 1024  # per-layer `MeanMapper` size (--pretrain_embed_dimension 1024)
    target_dim: int = 1024  # `Aggregator` size of the final patch feature (--target_embed_dimension 1024)
    coreset_fraction: float = 0.1  # approx_greedy_coreset -p 0.1 (1 keeps every patch)
    coreset_projection: int = 128  # sampler.py: dimension_to_project_features_to
    coreset_starts: int = 10  # sampler.py: number_of_starting_points
    neighbours: int = 1  # k of the nearest-neighbour score (--anomaly_scorer_num_nn 1; the CLI default is 5)
    blur_sigma: float = 4.0  # RescaleSegmentor: scipy gaussian_filter(sigma=4)
    # one bank per class (the class index is known at test time) or one shared bank (notes section 7);
    # not an official setting: the official code trains one model per class, i.e. `per_class`
    bank: Literal["per_class", "shared"] = "per_class"
    seed: int = 0  # run_patchcore.py --seed 0: projection weights and start points

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(str(name) for name in self.feature_layers))
        problems = []
        if not self.backbone:
            problems.append("backbone must name a backbone (wide_resnet50_2, lite, ...)")
        if not self.feature_layers:
            problems.append("feature_layers must list at least one layer, e.g. [layer2, layer3]")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            problems.append(f"patch_size must be odd and >= 1, got {self.patch_size}")
        if min(self.pretrain_dim, self.target_dim, self.coreset_projection, self.coreset_starts, self.neighbours) < 1:
            problems.append("pretrain_dim, target_dim, coreset_projection, coreset_starts and neighbours must be >= 1")
        if not 0.0 < self.coreset_fraction <= 1.0:
            problems.append(f"coreset_fraction must be in (0, 1], got {self.coreset_fraction}")
        if not self.blur_sigma > 0:
            problems.append(f"blur_sigma must be > 0, got {self.blur_sigma}")
        if self.bank not in ("per_class", "shared"):
            problems.append(f"bank must be 'per_class' or 'shared', got {self.bank!r}")
        if problems:
            raise ConfigError("invalid PatchCore config: " + "; ".join(problems))


@dataclass(frozen=True)
class PatchCoreMeta(FeatureMeta):
    """What PatchCore learns about its data in `fit` (saved in config.json)."""

    bank_sizes: tuple[int, ...]  # rows of each bank: one per class (per_class) or one (shared)
    feature_dim: int  # size of a patch feature (target_dim)
    train_patches: int  # patches before subsampling, over all banks and ranks


def coreset_size(patches: int, fraction: float) -> int:
    """Patches kept of `patches`: int(N·p) as sampler.py, at least one; every patch for p = 1 (`IdentitySampler`)."""
    return patches if fraction >= 1.0 else max(1, int(patches * fraction))


class MemoryBank(nn.Module):
    """The coreset(s) as buffers, so they are saved as safetensors: all banks stacked, with row offsets."""

    def __init__(self, bank_sizes: tuple[int, ...], feature_dim: int):
        super().__init__()
        self.register_buffer("features", torch.zeros(sum(bank_sizes), feature_dim))  # (M, D)
        offsets = torch.tensor([0, *bank_sizes], dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets)  # (banks + 1,): bank b is rows offsets[b]:offsets[b + 1]

    def bank(self, index: int) -> Tensor:
        """(M_b, D) rows of bank `index`."""
        return self.features[int(self.offsets[index]):int(self.offsets[index + 1])]


class PatchCore(FeatureDetector):
    """PatchCore (Roth et al., CVPR 2022): a coreset memory bank of patch features, nearest-neighbour scores."""

    Config: ClassVar[type] = PatchCoreConfig
    Meta: ClassVar[type] = PatchCoreMeta
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the official IM224 WR50 baseline (sample_training.sh)
        "paper": {"backbone": "wide_resnet50_2", "feature_layers": ["layer2", "layer3"], "coreset_fraction": 0.1},
        # CPU on synth/*: EfficientNet-Lite0's stride-8 and stride-16 maps (28×28 and 14×14, as layer2 and layer3)
        # and the official 1 % coreset of its IM320 / ensemble runs (the greedy steps grow as N²)
        "quick": {"backbone": "lite", "feature_layers": ["block4", "block10"], "coreset_fraction": 0.01},
    }

    def build_module(self, meta: PatchCoreMeta) -> nn.Module:
        """An empty memory bank sized by `meta` (load fills it)."""
        return MemoryBank(tuple(meta.bank_sizes), meta.feature_dim)

    def embed(self, maps: list[Tensor]) -> Tensor:
        """Layer maps (in `feature_layers` order) → (B, N, target_dim) float32 patch features."""
        c = self.config
        return patch_embeddings(maps, c.pretrain_dim, c.target_dim, c.patch_size)

    # ------------------------------------------------------------------ fit

    def learn(self, train: TrainSet, device: torch.device) -> tuple[nn.Module, PatchCoreMeta]:
        """Build the memory bank(s) from every training image's patches."""
        c = self.config
        encoder = self.image_encoder(device)
        data = self.encode_training_set(train, c.feature_layers, scope="all")
        groups = self._bank_members(data.class_idx, train.class_names)
        sizes = tuple(coreset_size(len(members) * self._patches(data), c.coreset_fraction) for members in groups)
        meta = PatchCoreMeta(backbone=c.backbone, backbone_digest=encoder.digest, feature_layers=tuple(c.feature_layers),
                             class_names=tuple(train.class_names), bank_sizes=sizes, feature_dim=c.target_dim,
                             train_patches=self._patches(data) * len(data))
        module = self.build_module(meta).to(device)  # filled bank by bank: no second copy of the banks
        generator = torch.Generator().manual_seed(c.seed)
        for index, members in enumerate(groups):
            self._coreset(data, members, generator, module.bank(index))
        return module, meta

    def _bank_members(self, class_idx: Tensor, class_names: list[str]) -> list[Tensor]:
        """Training-image indices of each bank: one group per class, or all images in one group."""
        if self.config.bank == "shared":
            return [torch.arange(len(class_idx))]
        groups = [torch.nonzero(class_idx == c).flatten() for c in range(len(class_names))]
        empty = [class_names[c] for c, g in enumerate(groups) if len(g) == 0]
        if empty:
            raise DetectorError(f"class {empty[0]!r} has no training image; bank=per_class needs at least one per "
                                "class (set bank=shared to score it against the other classes' patches)")
        return groups

    @staticmethod
    def _patches(data: TrainingFeatures) -> int:
        """Patches per image: the first layer's grid."""
        return int(data.maps[0].shape[-1] * data.maps[0].shape[-2])

    def _chunks(self, data: TrainingFeatures, members: Tensor, device: torch.device):
        """Yield (first row, (b·N, D) patch features) for `members` in chunks of bounded size."""
        values = self._patches(data) * sum(m.shape[1] for m in data.maps) * self.config.patch_size ** 2
        step = max(1, EMBED_ELEMENTS // values)
        for start in range(0, len(members), step):
            chosen = members[start:start + step]
            maps = [m[chosen].to(device, torch.float32) for m in data.maps]
            yield start * self._patches(data), self.embed(maps).flatten(0, 1)

    def _coreset(self, data: TrainingFeatures, members: Tensor, generator: torch.Generator, bank: Tensor) -> None:
        """Write the coreset of the patches of training images `members` into `bank` (count, D), on its device.

        Only the 128-d projections of all patches are held (N × 128); the full features of the chosen
        patches are recomputed chunk by chunk, so memory stays O(N · 128 + count · D).
        """
        c = self.config
        device, count = bank.device, len(bank)
        total = len(members) * self._patches(data)
        if count == total:  # the official IdentitySampler: every patch
            for first, features in self._chunks(data, members, device):
                bank[first:first + len(features)] = features
            return
        weights = random_projection(c.target_dim, c.coreset_projection, generator).to(device)  # (128, D)
        projected = torch.cat([features @ weights.T for _, features in self._chunks(data, members, device)])
        chosen = greedy_coreset(projected, count, draw_starts(total, c.coreset_starts, generator),
                                progress=distributed.info().is_main)
        del projected
        slot = torch.full((total,), -1, dtype=torch.int64)
        slot[chosen] = torch.arange(count)  # where each chosen patch goes in the bank (selection order)
        for first, features in self._chunks(data, members, device):
            where = slot[first:first + len(features)]
            keep = torch.nonzero(where >= 0).flatten()
            bank[where[keep].to(device)] = features[keep.to(device)]

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def patch_scores(self, images: Tensor, class_idx: Tensor) -> Tensor:
        """(B, N) squared L2 distance of each patch to its nearest bank entries (mean over k), on the model's device."""
        device = self.check_inputs(images, class_idx)
        # through the feature cache: repeated runs on one test set encode it once; the values are the cache's
        # float16 rounding, exactly as the training features
        features = FeatureCache(progress=False).encode(self.image_encoder(device), images)
        patches = self.embed([features.maps[name] for name in self.meta_.feature_layers])  # (B, N, D)
        bank_of = class_idx.to(device) if self.config.bank == "per_class" else torch.zeros_like(class_idx, device=device)
        scores = torch.empty(patches.shape[:2], device=device)
        for bank in torch.unique(bank_of).tolist():
            rows = torch.nonzero(bank_of == bank).flatten()
            distances, _ = nearest_distances(patches[rows].flatten(0, 1), self.module_.bank(bank), self.config.neighbours)
            scores[rows] = distances.mean(1).view(len(rows), -1)
        return scores

    def predict(self, images: Tensor, class_idx: Tensor) -> Prediction:
        """Image scores (B,) = max patch score and anomaly maps (B, 224, 224) for images (B, 3, 224, 224) in [0, 1]."""
        scores = self.patch_scores(images, class_idx)  # (B, N)
        maps = grid_to_image(scores, align_corners=False)  # RescaleSegmentor: F.interpolate, align_corners False
        return Prediction(image_scores=scores.max(1).values.float().cpu(),
                          anomaly_maps=gaussian_blur(maps, self.config.blur_sigma))
