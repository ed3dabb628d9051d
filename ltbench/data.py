"""Records to tensors: images and masks at the evaluation size, and the `TrainSet` the runner hands to `fit`.

Images are RGB, resized to 224x224 with an antialiased bilinear filter, float32 in [0, 1], not
normalised (each backbone applies its own). Masks are resized with nearest neighbour and
binarised, non-zero = anomaly (DESIGN.md, "Evaluation protocol"). Every read error names the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ltbench import distributed
from ltbench.datasets.base import Catalog, Record
from ltbench.detector import IMAGE_SIZE
from ltbench.errors import DatasetError
from ltbench.training import epoch_seed

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open_loaded(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image file, so that truncation is found here and not later."""
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist; check the dataset root")
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except _READ_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DatasetError(
            f"cannot read {what} {path}: {reason}; the file is corrupt or truncated, replace it "
            "(e.g. download or extract the dataset again)"
        ) from None


def read_image_uint8(path: str | Path) -> tuple[Tensor, tuple[int, int]]:
    """Read an image as RGB uint8 at the evaluation size.

    Parameters: path: the image file.
    Returns: (image (3, 224, 224) uint8, the source size as (width, height) in pixels).
    Raises `DatasetError` naming the file when it is missing, corrupt or truncated.
    """
    image = _open_loaded(Path(path), "image")
    source_size = image.size
    rgb = image.convert("RGB")
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)  # antialiased when shrinking
    array = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), source_size


def load_image(path: str | Path) -> Tensor:
    """Read an image for a detector.

    Parameters: path: the image file (any format Pillow reads; greyscale becomes RGB).
    Returns: (3, 224, 224) float32 RGB in [0, 1]. Raises `DatasetError` naming a corrupt or truncated file.
    """
    image, _ = read_image_uint8(path)
    return image.float().div_(255.0)


def load_mask(path: str | Path | None, image_size: tuple[int, int]) -> Tensor:
    """Read a ground-truth mask at the evaluation size.

    Parameters: path: the mask file, or None for a normal image (an all-normal mask);
    image_size: the source size of its image as (width, height), as `read_image_uint8` returns it.
    Returns: (224, 224) bool, True = anomalous pixel (nearest-neighbour resize, non-zero = anomaly).
    Raises `DatasetError` naming the file when it is unreadable or its size differs from its image's.
    """
    if path is None:
        return torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    path = Path(path)
    mask = _open_loaded(path, "mask")
    if tuple(mask.size) != tuple(image_size):
        raise DatasetError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} pixels but its image is {image_size[0]}x{image_size[1]}; "
            "a mask must have its image's size (check that the mask belongs to this image)"
        )
    grey = mask.convert("L")
    if grey.size != (IMAGE_SIZE, IMAGE_SIZE):
        grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(grey) > 0)


# ----------------------------------------------------------------------------- training set


class RecordTrainSet:
    """The training images of a split manifest, as the `TrainSet` of the detector contract.

    Images are decoded once and kept in memory as uint8 (150 KB each); `batches` yields them as
    float32 on the CPU (the detector moves them to `device`). With `progress`, each pass over the
    data shows a bar with its rate. Under `torchrun` / `accelerate launch` each rank sees only its
    shard of every pass (as `DistributedSampler` does: padded so that all ranks get equally many),
    and `len()` is the size of that shard.
    """

    def __init__(self, catalog: Catalog, manifest, device: torch.device | str, checkpoint_dir: Path,
                 seed: int = 0, progress: bool = False, cache: bool = True):
        self.class_names: list[str] = list(manifest.class_order)
        self.device = torch.device(device)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.seed = seed          # the run's seed, mixed into every shuffle
        self.progress = progress
        index = {name: i for i, name in enumerate(self.class_names)}
        self._paths = [catalog.path(row.image) for row in manifest.rows]
        self._class_idx = torch.tensor([index[row.class_name] for row in manifest.rows], dtype=torch.int64)
        self._cache: dict[int, Tensor] | None = {} if cache else None
        self._passes = 0

    def __len__(self) -> int:
        return len(distributed.shard(range(len(self._paths))))

    @property
    def total(self) -> int:
        """The number of training images over all ranks (`len()` is this rank's shard under torchrun)."""
        return len(self._paths)

    def _image(self, i: int) -> Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        image, _ = read_image_uint8(self._paths[i])
        if self._cache is not None:
            self._cache[i] = image
        return image

    def order(self, shuffle: bool = True, seed: int = 0) -> Tensor:
        """The image order of one pass: a permutation drawn from (run seed, `seed`), or 0..N-1."""
        if not shuffle:
            return torch.arange(len(self._paths))
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, seed))
        return torch.randperm(len(self._paths), generator=generator)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield images (B, 3, 224, 224) float32 in [0, 1] and class_idx (B,) int64, on the CPU.

        Parameters: batch_size: B (the last batch may be smaller); shuffle: draw a seeded order;
        seed: the detector's seed for this pass (e.g. the epoch), combined with the run's seed.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self._passes += 1
        order = distributed.shard(self.order(shuffle, seed).tolist())  # every image on one process
        with tqdm(total=len(order), desc=f"fit pass {self._passes}", unit="img", leave=False,
                  disable=not self.progress) as bar:
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                images = torch.stack([self._image(i) for i in chosen]).float().div_(255.0)
                yield images, self._class_idx[chosen]
                bar.update(len(chosen))


# ----------------------------------------------------------------------------- test set


@dataclass
class EvalBatch:
    """A batch of test images with what evaluation needs."""

    images: Tensor     # (B, 3, 224, 224) float32 in [0, 1]
    class_idx: Tensor  # (B,) int64, indexing the split's class order
    masks: Tensor      # (B, 224, 224) bool, True = anomalous pixel
    records: list[Record]


def evaluation_batches(catalog: Catalog, records: Sequence[Record], class_names: Sequence[str],
                 batch_size: int) -> Iterator[EvalBatch]:
    """Yield the test `records` in order, `batch_size` at a time, with their masks.

    Raises `DatasetError` naming a corrupt image or a mask whose size differs from its image's.
    """
    index = {name: i for i, name in enumerate(class_names)}
    for start in range(0, len(records), batch_size):
        chosen = list(records[start:start + batch_size])
        images, masks = [], []
        for record in chosen:
            image, size = read_image_uint8(catalog.path(record.image))
            images.append(image)
            masks.append(load_mask(catalog.path(record.mask) if record.mask else None, size))
        yield EvalBatch(images=torch.stack(images).float().div_(255.0),
                        class_idx=torch.tensor([index[r.class_name] for r in chosen], dtype=torch.int64),
                        masks=torch.stack(masks), records=chosen)
