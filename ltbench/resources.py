"""Where the files LTBench reads at run time live, in a checkout and in an installed wheel.

The one place that knows the package layout; every reader asks here. Two kinds of files:

- `data_files/` (official file lists, the paper's numbers and class orders) is part of the
  `ltbench` package in both cases.
- The pinned split manifests have one source of truth, the repository's top-level `splits/`
  (DESIGN.md, "Long-tailed split recipe"). A checkout or an editable install reads that folder;
  building a wheel copies it into the package as `ltbench/pinned_splits/` (see `setup.py`), and
  an installed wheel reads that copy. Nothing in the repository holds a second copy.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_FILES = PACKAGE_DIR / "data_files"
PACKAGED_SPLITS = "pinned_splits"          # the folder name of the copy inside a built package
CHECKOUT_SPLITS = PACKAGE_DIR.parent / "splits"


def pinned_splits_dir() -> Path:
    """The folder of pinned manifests (`<dataset>/<config>.csv|json`): the wheel's copy, else the checkout's `splits/`.

    Returns: the folder; it may be missing only in a broken installation (then no split is pinned).
    """
    packaged = PACKAGE_DIR / PACKAGED_SPLITS
    return packaged if packaged.is_dir() else CHECKOUT_SPLITS


def data_file(relative: str) -> Path:
    """A file shipped in `ltbench/data_files/`, e.g. `data_file("paper/class_orders.json")`.

    Parameters: relative: a POSIX path below `data_files/`.
    Returns: its absolute path (not checked for existence; readers report a missing file).
    """
    return DATA_FILES / relative
