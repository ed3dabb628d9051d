"""`ltbench run` under torchrun with 2 CPU processes (gloo): one run directory, written once, every test image once.

That the trained weights equal a one-process run's is `test_data_parallel_exact.py`.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ltbench.datasets.folder import read_catalog
from ltbench.splits import build_split
from tests.fakes import SPOT_BAD, SPOT_CLASSES, SPOT_GOOD, make_spot_tree

SETTINGS = ["backbone=lite", "hidden=32", "heads=2", "encoder_layers=1", "decoder_layers=1", "feedforward=64",
            "dropout=0.0", "epochs=10", "lr=1e-3", "batch_size=2"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(launcher: list[str], tree: Path, split: Path, out: Path, home: Path) -> subprocess.CompletedProcess:
    args = ["run", "--model", "uniad", "--split", str(split), "--root", str(tree), "--out", str(out),
            "--device", "cpu"]
    for setting in SETTINGS:
        args += ["--set", setting]
    env = {**os.environ, "LTBENCH_HOME": str(home), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([*launcher, "-m", "ltbench.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def _only_run_dir(out: Path) -> Path:
    (metrics,) = list(out.rglob("metrics.json"))  # exactly one finished run
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]  # nothing half-written left
    return metrics.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    tree = make_spot_tree(base / "data")
    split = base / "split" / "tiny.csv"
    build_split(read_catalog(tree), "exp", 2).write(split)
    home = base / "home"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    double = _run(torchrun, tree, split, base / "out2", home)
    assert double.returncode == 0, double.stderr[-3000:]
    return _only_run_dir(base / "out2"), double


def test_two_processes_write_one_run_directory_once(runs):
    run_dir, double = runs
    assert double.stdout.count("Run directory:") == 1  # only rank 0 reports (its final line)
    assert double.stdout.count("All (2)") == 1         # and prints the table once
    assert "Distributed: 2 processes (cpu)" in double.stderr
    rows = list(csv.DictReader((run_dir / "scores.csv").open()))
    expected = len(SPOT_CLASSES) * (SPOT_GOOD + SPOT_BAD)
    assert len(rows) == expected and len({r["image"] for r in rows}) == expected  # every test image exactly once
    assert (run_dir / "model" / "model.safetensors").is_file()
