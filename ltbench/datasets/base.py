"""Typed records shared by every dataset catalog."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

NORMAL = 0
ANOMALY = 1


@dataclass(frozen=True)
class Record:
    """One image of a dataset, as a catalog reads it from disk.

    Paths are POSIX strings relative to the catalog root, so that manifests and file lists
    do not depend on where a user keeps the data.
    """

    class_name: str                      # product / texture class, e.g. "hazelnut"
    split: Literal["train", "test"]      # the dataset's own train/test split
    label: int                           # NORMAL (0) or ANOMALY (1)
    defect_type: str                     # "good" for normal images, else the defect folder/type
    image: str                           # image path relative to the root
    mask: str | None = None              # ground-truth mask relative to the root; None for normals


@dataclass
class Catalog:
    """Every record of one dataset root, with the dataset's canonical class order."""

    dataset: str                         # "mvtec", "visa", "dagm", "folder", "synth"
    root: Path                           # the dataset root on this machine
    class_names: list[str]               # canonical order (the paper's long-tail order where one exists)
    records: list[Record] = field(default_factory=list)

    def path(self, relative: str) -> Path:
        """Absolute path of a record's image or mask."""
        return self.root / relative

    def train_normals(self, class_name: str) -> list[Record]:
        """Normal training records of one class, sorted by image path."""
        return sorted(
            (r for r in self.records if r.class_name == class_name and r.split == "train" and r.label == NORMAL),
            key=lambda r: r.image,
        )

    def test_records(self, class_name: str | None = None) -> list[Record]:
        """Test records (all classes, or one), sorted by class order then image path."""
        order = {name: i for i, name in enumerate(self.class_names)}
        selected = [r for r in self.records if r.split == "test" and (class_name is None or r.class_name == class_name)]
        return sorted(selected, key=lambda r: (order.get(r.class_name, len(order)), r.image))

    def fingerprint(self) -> str:
        """sha256 over the sorted list of (class, split, label, image, mask): identifies the file list."""
        digest = hashlib.sha256()
        for r in sorted(self.records, key=lambda r: r.image):
            digest.update(f"{r.class_name}\t{r.split}\t{r.label}\t{r.image}\t{r.mask or ''}\n".encode())
        return digest.hexdigest()
