"""Dataset catalogs: one module per dataset, each reading a root into `Record`s.

`open_catalog(dataset, root)` is the single entry point; `resolve_root` applies the
`--root` / `$LTBENCH_DATA/<dataset>` rule. Each dataset module exposes `INFO` (a `DatasetInfo`:
title, licence, layout, class order, N_max, pinned configurations, download sources; read
through `dataset_info`), `CLASS_ORDER` and `read_catalog(root)`; modules may also expose
`expected_files(root)` (the official file list, for `ltbench verify`), `canonical_path(image)`
and `localize_paths(root, images)` (for datasets with more than one on-disk layout). A new
dataset is one module (plus its file list) and its name in `DATASETS`.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType

from ltbench.datasets.base import ANOMALY, NORMAL, ArchiveSource, Catalog, DatasetInfo, Record
from ltbench.errors import DatasetError
from ltbench.resources import DATA_FILES

__all__ = [
    "ANOMALY",
    "DATASETS",
    "DATA_FILES",
    "IMAGE_SUFFIXES",
    "NORMAL",
    "ArchiveSource",
    "Catalog",
    "DatasetInfo",
    "FileCheck",
    "Record",
    "check_files",
    "dataset_info",
    "dataset_module",
    "image_files_under",
    "layout_of",
    "open_catalog",
    "paper_class_order",
    "resolve_root",
]

DATASETS = ("mvtec", "visa", "dagm", "synth", "folder")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


def dataset_module(dataset: str) -> ModuleType:
    """The catalog module of a dataset name; unknown names raise `DatasetError` listing the known ones."""
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    try:
        return importlib.import_module(f"ltbench.datasets.{dataset}")
    except ModuleNotFoundError as exc:
        if exc.name != f"ltbench.datasets.{dataset}":
            raise
        raise DatasetError(f"dataset {dataset!r} is not available in this installation "
                           f"(ltbench/datasets/{dataset}.py is missing): reinstall ltbench") from exc


def dataset_info(dataset: str) -> DatasetInfo:
    """The description of a dataset (its module's `INFO`); unknown names raise `DatasetError`."""
    return dataset_module(dataset).INFO


def layout_of(dataset: str) -> str:
    """A phrase describing the folder layout a dataset root must have (for error messages)."""
    return dataset_info(dataset).layout


@cache
def paper_class_order(name: str) -> tuple[str, ...]:
    """A class order from the shipped `paper/class_orders.json` ("mvtec", "visa", "dagm", "dagm_reverse")."""
    with open(DATA_FILES / "paper" / "class_orders.json", encoding="utf-8") as handle:
        return tuple(json.load(handle)[name])


def _ensure_synth() -> Path:
    """The built-in synthetic dataset's root, generated on first use with a progress bar."""
    synth = dataset_module("synth")
    if synth.is_generated():
        return synth.ensure_generated()
    from tqdm.auto import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: synth forks worker processes only when single-threaded
    with tqdm(desc="generating synth", unit="img") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return synth.ensure_generated(progress=progress)


def resolve_root(dataset: str, root: str | os.PathLike | None) -> tuple[Path, str]:
    """Find a dataset's root: `--root`, else `$LTBENCH_DATA/<dataset>` (for `synth`, the generated copy).

    Parameters: dataset: a name of `DATASETS`; root: the `--root` value or None.
    Returns: the root (an existing folder) and a sentence saying where it came from.
    """
    dataset_module(dataset)
    if root is not None:
        path = Path(root).expanduser()
        source = f"{dataset} root {path} (from --root)"
    elif dataset == "synth":
        path = _ensure_synth()
        return Path(path), f"synth root {path} (the generated synthetic dataset under $LTBENCH_HOME)"
    elif os.environ.get("LTBENCH_DATA"):
        path = Path(os.environ["LTBENCH_DATA"]).expanduser() / dataset
        source = f"{dataset} root {path} (from $LTBENCH_DATA/{dataset})"
    else:
        raise DatasetError(f"no root for dataset {dataset!r}: pass --root DIR, or set LTBENCH_DATA to a "
                           f"folder that holds {dataset}/")
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{dataset} root {path} {what}: pass --root DIR pointing at the extracted dataset, "
                           f"or set LTBENCH_DATA so that $LTBENCH_DATA/{dataset} is it")
    return path, source


def open_catalog(dataset: str, root: str | os.PathLike | None = None) -> Catalog:
    """Read a dataset root into a `Catalog` (root resolved with `resolve_root`)."""
    path, _ = resolve_root(dataset, root)
    return dataset_module(dataset).read_catalog(path)


def image_files_under(root: Path, folders: list[str]) -> set[str]:
    """Image files (by suffix) below `root/<folder>` for each folder, as POSIX paths relative to root."""
    found: set[str] = set()
    for folder in folders:
        top = root / folder
        if not top.is_dir():
            continue
        for directory, subdirs, files in os.walk(top):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            relative_dir = Path(directory).relative_to(root).as_posix()
            for name in files:
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    found.add(f"{relative_dir}/{name}")
    return found


@dataclass
class FileCheck:
    """Result of comparing a dataset root with its expected file list."""

    dataset: str
    root: Path
    expected: int                                       # number of files the list names
    missing: list[str] = field(default_factory=list)     # named by the list, absent on disk (sorted)
    unexpected: list[str] = field(default_factory=list)  # images on disk the list does not name (sorted)


def check_files(dataset: str, root: str | os.PathLike) -> FileCheck:
    """Compare the images and masks under `root` with the dataset's file list.

    MVTec AD and VisA use the shipped official lists; DAGM uses its `Labels.txt` files; `folder`
    and `synth` use the catalog read from the tree. Raises `DatasetError` when nothing of the
    dataset is found under `root` (saying which layout was expected).
    """
    module = dataset_module(dataset)
    root = Path(root)
    if hasattr(module, "expected_files"):
        expected = set(module.expected_files(root))
        folders = sorted({path.split("/", 1)[0] for path in expected})
    else:
        catalog = module.read_catalog(root)
        expected = {r.image for r in catalog.records} | {r.mask for r in catalog.records if r.mask}
        folders = list(catalog.class_names)
    present = image_files_under(root, folders)
    if expected and not (expected & present):
        raise DatasetError(f"{root} holds none of the {len(expected)} files of {dataset}: expected "
                           f"{layout_of(dataset)}")
    return FileCheck(dataset, root, len(expected), sorted(expected - present), sorted(present - expected))
