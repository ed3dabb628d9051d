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


@dataclass(frozen=True)
class ArchiveSource:
    """One archive of a dataset: its file name, where to fetch it and its pinned sha256 (None: not pinned)."""

    filename: str
    url: str
    sha256: str | None


@dataclass(frozen=True)
class DatasetInfo:
    """Everything LTBench knows about a dataset apart from its files: one per dataset module (`INFO`).

    The CLI's choices, the download, the pinned splits, the 🤗 dataset card and the leaderboard's
    titles all read this description, so a new dataset is one module (plus its file list).
    """

    name: str                                  # the --dataset value and the first part of split names
    title: str                                 # who made it, e.g. "MVTec AD (MVTec Software GmbH)"
    table_title: str                           # its name in leaderboard titles, e.g. "MVTec"
    licence_id: str                            # Hugging Face Hub licence identifier ("cc-by-4.0", "other", ...)
    licence: str                               # licence in words
    homepage: str                              # where the terms are published
    citation: str                              # BibTeX of the paper(s) to cite ("" for none)
    layout: str                                # the folder layout a root must have, for error messages
    class_order: tuple[str, ...] = ()          # canonical (long-tail) order; () = derived from each root
    n_max: int | None = None                   # the recipe's N_max; None = the largest class of the root
    pinned_configs: tuple[str, ...] = ()       # configurations shipped in splits/<name>/
    recipe_only: bool = False                  # no public file list: only the recipe of a split is pinned
    paper_benchmark: bool = False              # one of the LTAD paper's long-tailed ("-LT") benchmarks
    sources: tuple[ArchiveSource, ...] = ()    # archives `ltbench download` fetches; () = not downloadable

    def licence_line(self) -> str:
        """One line naming the dataset, its licence and where its terms are: printed before a download."""
        return f"{self.title} is distributed under {self.licence}; terms: {self.homepage}"
