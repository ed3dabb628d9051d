"""Shared fixtures: fake dataset trees (built by `tests/fakes.py`) and a clean environment.

Fake trees hold thousands of small files, so they live on tmpfs (`/dev/shm`) where there is
one: creating files there is ~50x faster than on a busy disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fakes
import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_ltbench_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test writes its feature cache and generated data under a temporary $LTBENCH_HOME, never ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LTBENCH_HOME", str(tmp_path_factory.mktemp("ltbench-home")))
        yield


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No `$LTBENCH_DATA`; `$LTBENCH_HOME` in a temporary folder (returned)."""
    monkeypatch.delenv("LTBENCH_DATA", raising=False)
    home = tmp_path / "ltbench-home"
    monkeypatch.setenv("LTBENCH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def fast_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session folder on tmpfs when there is one (removed at the end), else under pytest's tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="ltbench-tests-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fast")


@pytest.fixture
def fast_path(fast_tmp: Path) -> Iterator[Path]:
    """A fresh empty folder for one test, on tmpfs when there is one."""
    path = Path(tempfile.mkdtemp(dir=fast_tmp))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mvtec_tree(fast_path: Path) -> Path:
    """A small MVTec AD tree: all 15 classes, 4 training normals each, tiny PNGs and masks."""
    return fakes.make_mvtec_tree(fast_path / "mvtec")


@pytest.fixture(scope="session")
def mvtec_names_tree(fast_tmp: Path) -> Path:
    """Every MVTec AD file name of the shipped list, as empty files (read-only: shared by tests)."""
    return fakes.make_mvtec_tree_from_file_list(fast_tmp / "mvtec-names")


@pytest.fixture(scope="session")
def visa_converted_names_tree(fast_tmp: Path) -> Path:
    """Every VisA file of the official split in the converted MVTec-style layout, as empty files (read-only)."""
    return fakes.make_visa_tree_from_file_list(fast_tmp / "visa-converted", layout="converted")


@pytest.fixture
def dagm_tree(fast_path: Path) -> Path:
    """A small flat DAGM tree (Class1-6: 5 training normals, Class7-10: 10; one defective per split)."""
    return fakes.make_dagm_tree(fast_path / "dagm")
