"""A base for detectors on a frozen backbone's features: what each of them would otherwise repeat.

`FeatureDetector` (a `TorchDetector`) owns:
- the frozen backbone, created lazily by name from `config.backbone` and recreated when the
  device changes; `load` refuses a backbone whose weights digest differs from the one trained on;
- encoding the training set once through the feature cache (`encode_training_set`), by default
  with every rank's features gathered on every rank (`scope="all"`: a memory bank or a density
  must see every training image, and a gradient method trains exactly like one process);
  `scope="shard"` keeps only this rank's share;
- `fit` with a private, seeded random state (the caller's generators are left as they were);
- the patch grid → 224×224 map (`grid_to_image`; `predict`'s input checks are `TorchDetector.check_inputs`);
- typed saved metadata (`FeatureMeta` and its subclasses) and the resumable training state
  (`progress`, see `ltbench.training`).
A subclass defines `Config` (with at least `backbone: str` and `seed: int`), `Meta`,
`build_module(meta)`, `learn(train, device) -> (module, meta)` and `predict`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ltbench import distributed
from ltbench.detector import IMAGE_SIZE, TorchDetector, TrainSet
from ltbench.errors import DetectorError
from ltbench.training import TrainingProgress, training_identity

ENCODE_BATCH = 32  # images per backbone call when caching the training features


@dataclass(frozen=True)
class FeatureMeta:
    """Facts learned in `fit` that every feature-based detector saves; subclasses add their own fields."""

    backbone: str  # the backbone's name as configured
    backbone_digest: str  # digest of its weights: a saved model refuses other weights
    feature_layers: tuple[str, ...]  # the encoder layers used, shallow to deep
    class_names: tuple[str, ...]  # the split's class order; class_idx indexes it


@dataclass
class TrainingFeatures:
    """The frozen encoder's output for the training set, held on the CPU in float16 (as the feature cache stores it)."""

    maps: list[Tensor]  # per requested layer (M, C_l, H_l, W_l), in the order asked for
    embeddings: Tensor  # (M, embed_dim) pooled image embedding
    class_idx: Tensor  # (M,) int64

    def __len__(self) -> int:
        return len(self.class_idx)


class FeatureDetector(TorchDetector, abc.ABC):
    """Base for detectors on a frozen backbone; see the module docstring for what it provides."""

    Meta: ClassVar[type] = FeatureMeta

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._backbone = None  # frozen encoders, created on first use (not learned, not saved)

    # ------------------------------------------------------------------ to implement

    @abc.abstractmethod
    def learn(self, train: TrainSet, device: torch.device) -> tuple[nn.Module, Any]:
        """Train on `train` (inside a seeded private random state); returns (module, meta)."""

    # ------------------------------------------------------------------ backbone

    def backbone(self, device: torch.device | str):
        """The frozen `ltbench.backbones.Backbone` of `config.backbone` on `device` (created on first use)."""
        from ltbench.backbones import create

        device = torch.device(device)
        if self._backbone is None or not same_device(self._backbone.image.device, device):
            self._backbone = create(self.config.backbone, device=device)
        return self._backbone

    def image_encoder(self, device: torch.device | str):
        """The frozen image encoder of `config.backbone` on `device`."""
        return self.backbone(device).image

    # ------------------------------------------------------------------ training features

    def encode_training_set(self, train: TrainSet, layers: Sequence[str] | None = None,
                            scope: Literal["all", "shard"] = "all",
                            transform: Callable[[list[Tensor]], Tensor] | None = None) -> TrainingFeatures:
        """Encode every training image once through the feature cache.

        Parameters: layers: encoder layer names to keep (None = all, in the encoder's order);
        scope: "all" = every rank's images on every rank, in the TrainSet's order (the safe
        default: a memory bank or density estimate needs them all, and gradient methods then train
        exactly like one process); "shard" = only this rank's share under torchrun;
        transform: applied to each batch's maps (float32, on the encoder's device) to keep
        something smaller than the maps, e.g. patch tokens; the result is the one entry of `maps`.
        Returns: the maps (or transformed maps), embeddings and class indices, float16/int64 on the CPU.
        """
        from ltbench.feature_cache import FeatureCache

        if scope not in ("all", "shard"):
            raise DetectorError(f"scope must be 'all' or 'shard'; got {scope!r}")
        encoder = self.image_encoder(train.device)
        names = list(encoder.layer_names) if layers is None else list(layers)
        unknown = [name for name in names if name not in encoder.layer_names]
        if unknown:
            raise DetectorError(f"backbone {encoder.name!r} has no layer {unknown[0]!r}; it has {list(encoder.layer_names)}")
        cache = FeatureCache()
        maps: list[list[Tensor]] = []
        embeddings, labels = [], []
        bar = tqdm(total=len(train), desc=f"{type(self).__name__.lower()} features", unit="img", leave=False,
                   disable=not distributed.info().is_main)
        for images, class_idx in train.batches(ENCODE_BATCH, shuffle=False):
            features = cache.encode(encoder, images.to(train.device))
            chosen = [features.maps[name] for name in names]
            kept = [transform(chosen)] if transform is not None else chosen
            maps.append([m.to("cpu", torch.float16) for m in kept])
            embeddings.append(features.embedding.to("cpu", torch.float16))
            labels.append(class_idx.to("cpu", torch.int64))
            bar.update(len(images))
        bar.close()
        local = TrainingFeatures([torch.cat(layer) for layer in zip(*maps)] if maps else [],
                                 torch.cat(embeddings) if embeddings else torch.zeros(0),
                                 torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64))
        if scope == "all" and distributed.info().enabled:
            local = _gather_shards(local, distributed.gather(local), getattr(train, "total", None))
        if len(local) == 0:
            raise DetectorError(f"the training set is empty; {type(self).__name__} needs at least one normal image")
        if int(local.class_idx.min()) < 0 or int(local.class_idx.max()) >= len(train.class_names):
            raise DetectorError(f"training class_idx must lie in [0, {len(train.class_names)}); the TrainSet is inconsistent")
        return local

    # ------------------------------------------------------------------ fit

    def fit(self, train: TrainSet) -> FeatureDetector:
        """Learn from the normal images of `train` (resuming from its checkpoint folder); returns self.

        Randomness comes from `config.seed` alone; the caller's torch generators are left as they were.
        """
        device = torch.device(train.device)
        with seeded_rng(device, self.config.seed):
            module, meta = self.learn(train, device)
        module.eval()
        self.module_, self.meta_ = module, meta
        return self

    def progress(self, train: TrainSet, meta: Any) -> TrainingProgress:
        """The resumable training state of this fit in `train.checkpoint_dir`, bound to this config and meta."""
        return TrainingProgress(Path(train.checkpoint_dir), training_identity(self.config, meta))

    # ------------------------------------------------------------------ persistence

    @classmethod
    def load(cls, directory: Path) -> FeatureDetector:
        """Rebuild a saved detector; the backbone must be the one it was trained on (same weights digest)."""
        detector = super().load(directory)
        digest = detector.image_encoder(torch.device("cpu")).digest
        if digest != detector.meta_.backbone_digest:
            raise DetectorError(
                f"{directory} was trained on backbone {detector.meta_.backbone!r} with weights digest "
                f"{detector.meta_.backbone_digest}, but {detector.config.backbone!r} now has digest {digest}; "
                "load the same backbone weights or retrain"
            )
        return detector


# ----------------------------------------------------------------------------- helpers


def training_images(train: TrainSet) -> tuple[Tensor, Tensor]:
    """Every training image of every rank, in the TrainSet's order, held on the CPU as 8-bit RGB.

    For detectors that train on raw images and need any image at any step (RegAD draws support
    images of a query's class). 8 bits hold the runner's images exactly (they are read from 8-bit
    files); other inputs are rounded to the nearest 1/255.
    Returns: (images (N, 3, 224, 224) uint8, class_idx (N,) int64). Raises `DetectorError` when empty.
    """
    images, labels = [], []
    for batch, class_idx in train.batches(ENCODE_BATCH, shuffle=False):
        images.append(batch.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu())
        labels.append(class_idx.to("cpu", torch.int64))
    local = TrainingFeatures([torch.cat(images)] if images else [], torch.zeros(sum(len(i) for i in images), 0),
                             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64))
    if distributed.info().enabled:
        local = _gather_shards(local, distributed.gather(local), getattr(train, "total", None))
    if len(local) == 0:
        raise DetectorError("the training set is empty; at least one normal image is needed")
    return local.maps[0], local.class_idx


def patch_tokens(maps: Sequence[Tensor], grid: int, antialias: bool = False) -> Tensor:
    """Feature maps → patch tokens (B, grid², ΣC_l): each map resized bilinearly to grid × grid, stacked, row-major.

    antialias: average over the source pixels a token covers when downsampling (without it,
    bilinear 112² → 14² reads 2×2 of every 8×8 pixels and never samples about 3/4 of the map).
    """
    from collections import OrderedDict

    from ltbench.backbones import to_patch_tokens

    if antialias:
        maps = [m if m.shape[-2:] == (grid, grid) else
                F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True) for m in maps]
    named = OrderedDict((str(index), m) for index, m in enumerate(maps))
    return to_patch_tokens(named, grid=grid).flatten(2).transpose(1, 2).contiguous()  # (B, N, ΣC_l)


def grid_to_image(scores: Tensor, align_corners: bool = True) -> Tensor:
    """Patch scores on a square row-major grid → (B, 224, 224) float32 maps on the CPU, bilinear.

    Parameters: scores: (B, N) with N = g² tokens in row-major order, or (B, g, g);
    align_corners: True as UniAD's official `nn.UpsamplingBilinear2d`.
    """
    if scores.ndim == 2:
        grid = round(scores.shape[1] ** 0.5)
        if grid * grid != scores.shape[1]:
            raise DetectorError(f"{scores.shape[1]} patch scores do not form a square grid")
        scores = scores.view(-1, grid, grid)
    small = scores[:, None].float()  # (B, 1, g, g)
    maps = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=align_corners)
    return maps[:, 0].cpu()  # (B, 224, 224)


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's global generators with `seed` inside, and restore the caller's state (CPU and `device`) after."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same ("cuda" and "cuda:0" are, when device 0 is the current one)."""
    def index(d: torch.device) -> int:
        return d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)

    return a.type == b.type and index(a) == index(b)


def _gather_shards(local: TrainingFeatures, shards: list[TrainingFeatures], count: int | None) -> TrainingFeatures:
    """Every rank's interleaved shard (`distributed.shard`, padded) → the whole set in the original order.

    Rank r's k-th item is item k·W + r of the padded order; the padding (repeats of the first
    items, as `DistributedSampler` pads) is cut off at `count`, the size of the whole set, when the
    TrainSet tells it (`total`); otherwise up to W − 1 images appear twice.
    """
    world = len(shards)
    total = sum(len(shard) for shard in shards)
    order = torch.empty(total, dtype=torch.int64)
    offset = 0
    for rank, shard in enumerate(shards):
        order[offset:offset + len(shard)] = torch.arange(len(shard)) * world + rank
        offset += len(shard)
    inverse = torch.argsort(order)  # position k of the padded order is row inverse[k] of the concatenation

    inverse = inverse[:count] if count is not None else inverse

    def merge(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts)[inverse]

    merged = TrainingFeatures(
        maps=[merge([shard.maps[i] for shard in shards]) for i in range(len(local.maps))],
        embeddings=merge([shard.embeddings for shard in shards]),
        class_idx=merge([shard.class_idx for shard in shards]),
    )
    return merged
