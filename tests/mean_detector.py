"""A tiny detector written only against the contract text of DESIGN.md (it inherits nothing).

It learns each class's mean image at a low resolution, as the average of one mean per epoch
(each epoch reads the training set in its own shuffled order), checkpointing after every
epoch; the anomaly map is the squared distance to the class mean, upsampled to 224x224.
With $MEAN_DETECTOR_STOP_AFTER=k it raises KeyboardInterrupt after epoch k (to test --resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ltbench.detector import Prediction
from ltbench.errors import DetectorError

STOP_AFTER_ENV = "MEAN_DETECTOR_STOP_AFTER"


@dataclass(frozen=True)
class MeanConfig:
    epochs: int = 2       # passes over the training set
    grid: int = 16        # side of the low-resolution mean image
    batch_size: int = 4   # images per batch


class MeanDetector:
    Config = MeanConfig
    PRESETS: ClassVar[dict[str, dict]] = {"quick": {"epochs": 2}, "paper": {"epochs": 3}}

    def __init__(self, config: MeanConfig):
        self.config = config

    def _small(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.config.grid)  # (B, 3, g, g)

    def fit(self, train) -> MeanDetector:
        g, n_classes = self.config.grid, len(train.class_names)
        state_file, progress_file = train.checkpoint_dir / "sums.safetensors", train.checkpoint_dir / "progress.json"
        sums, done = torch.zeros(n_classes, 3, g, g, dtype=torch.float64), 0
        if progress_file.is_file():  # resume after the last finished epoch
            done = json.loads(progress_file.read_text())["epochs_done"]
            sums = load_file(str(state_file))["sums"]
        for epoch in range(done, self.config.epochs):
            total = torch.zeros(n_classes, 3, g, g, dtype=torch.float64)
            count = torch.zeros(n_classes, dtype=torch.float64)
            for images, class_idx in train.batches(self.config.batch_size, shuffle=True, seed=epoch):
                total.index_add_(0, class_idx, self._small(images).double())
                count.index_add_(0, class_idx, torch.ones(len(class_idx), dtype=torch.float64))
            sums += total / count.clamp(min=1).view(-1, 1, 1, 1)
            save_file({"sums": sums}, str(state_file))
            progress_file.write_text(json.dumps({"epochs_done": epoch + 1}))
            if os.environ.get(STOP_AFTER_ENV) == str(epoch + 1):
                raise KeyboardInterrupt
        self.means_ = (sums / self.config.epochs).float()
        self.class_names_ = list(train.class_names)
        return self

    def predict(self, images: torch.Tensor, class_idx: torch.Tensor) -> Prediction:
        if not hasattr(self, "means_"):
            raise DetectorError("MeanDetector.predict called before fit()")
        distance = (self._small(images.float().cpu()) - self.means_[class_idx.cpu()]).pow(2).mean(1, keepdim=True)
        maps = F.interpolate(distance, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
        return Prediction(image_scores=maps.flatten(1).amax(1), anomaly_maps=maps)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"means": self.means_.contiguous()}, str(directory / "model.safetensors"))
        payload = {"config": dataclasses.asdict(self.config), "class_names": self.class_names_}
        (directory / "config.json").write_text(json.dumps(payload))

    @classmethod
    def load(cls, directory: Path) -> MeanDetector:
        payload = json.loads((Path(directory) / "config.json").read_text())
        tensors = load_file(str(Path(directory) / "model.safetensors"))
        if set(payload) != {"config", "class_names"} or set(tensors) != {"means"}:
            raise DetectorError(f"{directory} is not a saved MeanDetector (unexpected or missing keys)")
        detector = cls(MeanConfig(**payload["config"]))
        detector.means_, detector.class_names_ = tensors["means"], payload["class_names"]
        return detector


class ShiftedMeanDetector(MeanDetector):
    """A second method for leaderboard tests: the same maps, blurred (different numbers)."""

    def predict(self, images: torch.Tensor, class_idx: torch.Tensor) -> Prediction:
        prediction = super().predict(images, class_idx)
        maps = F.avg_pool2d(prediction.anomaly_maps[:, None], 31, stride=1, padding=15)[:, 0]
        return Prediction(image_scores=maps.flatten(1).mean(1), anomaly_maps=maps)


class NoSaveDetector:
    """Misses `save`: the registry must say so."""

    Config = MeanConfig

    def __init__(self, config: MeanConfig):
        self.config = config

    def fit(self, train):
        return self

    def predict(self, images, class_idx):
        raise DetectorError("not fitted")

    @classmethod
    def load(cls, directory):
        return cls(MeanConfig())


@dataclass(frozen=True)
class SeededMeanConfig(MeanConfig):
    seed: int = 7         # the detector's own seed; `ltbench run --seed N` must reach it


class SeededMeanDetector(MeanDetector):
    """MeanDetector whose config carries a seed, as UniAD's and LTAD's do."""

    Config = SeededMeanConfig


class ReportingMeanDetector(MeanDetector):
    """`MeanDetector` that logs to `ltbench.model` while fitting and reports diagnostics, as LTAD does."""

    def fit(self, train) -> ReportingMeanDetector:
        import logging

        super().fit(train)
        logging.getLogger("ltbench.model").info("fit saw %d images", len(train))
        logging.getLogger("ltbench.model").warning("the test warning")
        return self

    @property
    def diagnostics_(self) -> dict:
        return {"train_images_seen": 1, "note": "from the detector"}
