"""Shared fixtures: fake dataset trees (built by `tests/fakes.py`) and a clean environment."""

from __future__ import annotations

from pathlib import Path

import fakes
import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No `$LTBENCH_DATA`; `$LTBENCH_HOME` in a temporary folder (returned)."""
    monkeypatch.delenv("LTBENCH_DATA", raising=False)
    home = tmp_path / "ltbench-home"
    monkeypatch.setenv("LTBENCH_HOME", str(home))
    return home


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> Path:
    """A small MVTec AD tree: all 15 classes, 4 training normals each, tiny PNGs and masks."""
    return fakes.make_mvtec_tree(tmp_path / "mvtec")


@pytest.fixture(scope="session")
def mvtec_names_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every MVTec AD file name of the shipped list, as empty files (read-only use: shared by tests)."""
    return fakes.make_mvtec_tree_from_file_list(tmp_path_factory.mktemp("mvtec-names"))


@pytest.fixture(scope="session")
def visa_converted_names_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every VisA file of the official split in the converted MVTec-style layout, as empty files (read-only)."""
    return fakes.make_visa_tree_from_file_list(tmp_path_factory.mktemp("visa-converted"), layout="converted")


@pytest.fixture
def dagm_tree(tmp_path: Path) -> Path:
    """A small flat DAGM tree (Class1-6: 5 training normals, Class7-10: 10; one defective per split)."""
    return fakes.make_dagm_tree(tmp_path / "dagm")
