"""Build step that pyproject.toml cannot express: ship the pinned manifests inside the package.

The repository's top-level `splits/` is the one source of truth for pinned manifests (DESIGN.md).
A wheel must carry them, so `build_py` copies `splits/<dataset>/<config>.{csv,json}` into the
build tree as `ltbench/pinned_splits/` (`ltbench.resources.PACKAGED_SPLITS`); nothing is copied
into the source tree, and an editable install keeps reading `splits/` directly. Everything else
is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SPLITS = HERE / "splits"
PACKAGED_SPLITS = Path("ltbench") / "pinned_splits"  # must equal ltbench.resources.PACKAGED_SPLITS
MANIFEST_SUFFIXES = (".csv", ".json")


class BuildPyWithSplits(build_py):
    """`build_py` that also copies the pinned manifests into the package being built."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's splits/ itself
            return
        if not SPLITS.is_dir():
            raise SystemExit(f"{SPLITS} is missing: build from a checkout or an sdist, which both carry splits/")
        target = Path(self.build_lib) / PACKAGED_SPLITS
        if target.exists():
            shutil.rmtree(target)
        copied = 0
        for source in sorted(SPLITS.rglob("*")):
            if source.is_file() and source.suffix in MANIFEST_SUFFIXES:
                destination = target / source.relative_to(SPLITS)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, destination)
                copied += 1
        if copied == 0:
            raise SystemExit(f"{SPLITS} holds no manifests (*.csv, *.json): restore it from the repository")


setup(cmdclass={"build_py": BuildPyWithSplits})
