"""The installable package: the wheel carries every file LTBench reads at run time, and works outside the checkout.

Offline and fast: `python -m build --no-isolation` uses the test environment's setuptools, and
the wheel goes into a bare virtual environment (no pip, `--no-deps`) that sees the test
environment's packages (torch, ...) through a `.pth` line, after its own site-packages.
"""

from __future__ import annotations

import email
import os
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import ltbench
from ltbench import resources
from ltbench.splits import load_manifest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ltbench", "ltad_model", "baselines")


def _files_under(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (no caches), by POSIX path relative to it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) built from this checkout as `python -m build` does: the sdist first, the wheel from it."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0]


def test_wheel_carries_every_runtime_file(dist):
    wheel, sdist = dist
    assert wheel.name == f"ltbench-{ltbench.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        packaged_splits = {n[len("ltbench/pinned_splits/"):]: archive.read(n) for n in names
                           if n.startswith("ltbench/pinned_splits/")}
        data_files = {n[len("ltbench/data_files/"):]: archive.read(n) for n in names
                      if n.startswith("ltbench/data_files/")}
        info = f"ltbench-{ltbench.__version__}.dist-info"
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    # the pinned manifests: byte for byte the repository's splits/ (its one source of truth)
    assert packaged_splits == _files_under(REPO / "splits")
    assert len(packaged_splits) == len(list((REPO / "splits").rglob("*.json"))) + len(
        list((REPO / "splits").rglob("*.csv"))) >= 20
    assert data_files == _files_under(REPO / "ltbench" / "data_files")
    modules = {f"{package}/{name}" for package in PACKAGES for name in _files_under(REPO / package)
               if name.endswith(".py")}
    assert modules <= names, sorted(modules - names)
    assert not [n for n in names if n.startswith(("tests/", "splits/", "bench/"))]
    assert "ltbench = ltbench.cli:main" in entry_points
    assert metadata["Version"] == ltbench.__version__
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["Requires-Python"] == ">=3.10"
    assert set(metadata.get_all("Provides-Extra")) == {"hub", "dev"}
    assert any(line.startswith("datasets") and "extra == \"hub\"" in line for line in metadata.get_all("Requires-Dist"))
    assert f"{info}/licenses/LICENSE" in names
    # the sdist carries splits/ so that a wheel built from it has them too; no second copy in the source
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
    assert {f"splits/{n}" for n in packaged_splits} <= members
    assert not [m for m in members if m.startswith("ltbench/pinned_splits/")]
    assert not (REPO / "ltbench" / resources.PACKAGED_SPLITS).exists()


def _user_env() -> dict[str, str]:
    """The environment of a user outside the checkout: no PYTHONPATH (it would show this checkout), no $LTBENCH_DATA."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LTBENCH_DATA")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Path:
    """A fresh virtual environment outside the repository with only the wheel installed; returns its bin/."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", "--disable-pip-version-check", str(dist[0])], env=_user_env(), check=True, timeout=300)
    assert Path(purelib, "ltbench", "resources.py").is_file()
    # then the test environment's packages (torch, ...), after the venv's own: its editable ltbench is not
    # seen, because .pth files inside a folder added this way are not run
    ours = sorted(p for p in {*site.getsitepackages(), sysconfig.get_path("purelib")} if Path(p).is_dir())
    Path(purelib, "test-environment.pth").write_text("\n".join(ours) + "\n")
    return venv / "bin"


def _outside(bin_dir: Path, cwd: Path, program: str, *args: str) -> subprocess.CompletedProcess:
    """Run a program of the venv from `cwd`, as a user would: no PYTHONPATH to this checkout, no $LTBENCH_DATA."""
    return subprocess.run([str(bin_dir / program), *args], cwd=cwd, env=_user_env(), capture_output=True, text=True,
                          timeout=300, check=False)


def _ltbench(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return _outside(bin_dir, cwd, "ltbench", *args)


def test_installed_wheel_works_from_another_folder(installed, tmp_path):
    where = _outside(installed, tmp_path, "python", "-c",
                     "import ltbench.resources as r; print(r.PACKAGE_DIR); print(r.pinned_splits_dir())").stdout.split()
    package_dir = Path(where[0])
    assert package_dir.is_relative_to(installed.parent), where  # the wheel's copy, not this checkout
    assert Path(where[1]) == package_dir / resources.PACKAGED_SPLITS

    shown = _ltbench(installed, tmp_path, "show-split", "mvtec/exp100")
    assert shown.returncode == 0, shown.stderr
    manifest = load_manifest("mvtec/exp100")
    assert f"CSV sha256 {manifest.csv_sha256}" in shown.stdout
    assert f"     total                1378   {len(manifest.rows)}" in shown.stdout

    listed = _ltbench(installed, tmp_path, "list-splits")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 1 + len(list((REPO / "splits").rglob("*.json")))

    version = _ltbench(installed, tmp_path, "--version")
    assert version.stdout.strip() == f"ltbench, version {ltbench.__version__}"

    made = _ltbench(installed, tmp_path, "make-split", "--dataset", "visa", "--type", "exp", "--beta", "200")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "splits-out" / "visa" / "exp200.csv").read_bytes() == \
        (REPO / "splits" / "visa" / "exp200.csv").read_bytes()


def test_hub_commands_without_the_hub_extra_say_how_to_install_it(tmp_path):
    # `datasets` is only in the [hub] extra; None in sys.modules makes its import fail as if it were absent
    code = ("import sys; sys.modules['datasets'] = None; from ltbench.cli import main; "
            f"main(['export-hf', '--split', 'mvtec/exp100', '--out', {str(tmp_path / 'out')!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == ("Error: the Hugging Face commands need the package 'datasets': install them "
                                     "with pip install 'ltbench[hub]'")
    assert not (tmp_path / "out").exists()
