"""Leaderboard: runs that differ only in split seed or run seed become one cell, mean ± sample std (n)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ltbench.cli import main
from ltbench.leaderboard import build_leaderboard, render_csv
from ltbench.metrics import METRIC_KEYS
from ltbench.seed_groups import aggregate, format_stat
from ltbench.splits import load_manifest
from tests.fakes import make_varied_spot_tree

TESTS = Path(__file__).resolve().parent
MODEL = "tests.mean_detector:MeanDetector"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS.parent))  # so that tests.mean_detector imports
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("MEAN_DETECTOR_STOP_AFTER", raising=False)


def invoke(*args) -> tuple[str, str]:
    """Run `ltbench ARGS` in-process; returns (stdout, stderr) of a successful command."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def expected_cell(values: list[float]) -> str:
    """The cell computed directly with numpy: percentages, mean and sample std (ddof=1), n."""
    percent = 100.0 * np.asarray(values, dtype=np.float64)
    return f"{percent.mean():.2f} ± {percent.std(ddof=1):.2f} (n={len(values)})"


def test_three_split_seeds_of_a_tiny_detector_give_mean_and_sample_std(tmp_path):
    root = make_varied_spot_tree(tmp_path / "data")  # alpha 8 images (all kept), beta 4 (2 drawn: exp, beta 4)
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        invoke("make-split", "--dataset", "folder", "--root", root, "--type", "exp", "--beta", "4", "--seed", seed,
               "--out", tmp_path / f"X{seed}.csv")
        invoke("run", "--model", MODEL, "--split", tmp_path / f"X{seed}.csv", "--root", root, "--out", runs,
               "--device", "cpu", "--overlays", "0")
    manifests = [load_manifest(tmp_path / f"X{seed}.csv") for seed in (0, 1, 2)]
    assert [m.config for m in manifests] == ["exp4", "exp4-seed1", "exp4-seed2"]
    assert {(m.profile, m.beta, m.reverse, m.source_fingerprint) for m in manifests} == {
        ("exp", 4.0, False, manifests[0].source_fingerprint)}
    assert len({m.csv_sha256 for m in manifests}) == 3  # three different draws of beta's images

    metrics = sorted((json.loads(p.read_text()) for p in runs.rglob("metrics.json")), key=lambda m: m["split"])
    records = [json.loads((p.parent / "config.json").read_text()) for p in runs.rglob("metrics.json")]
    assert [r["source_fingerprint"] for r in records] == [manifests[0].source_fingerprint] * 3  # what groups them
    assert [m["split"] for m in metrics] == ["folder/exp4", "folder/exp4-seed1", "folder/exp4-seed2"]
    low = [m["summary"]["low"]["image_auroc"] for m in metrics]
    assert np.std(low) > 0  # the draw moves the Low numbers, so the std below is not vacuous

    rows = list(csv.DictReader(invoke("leaderboard", runs, "--per-class", "--format", "csv")[0].splitlines()))
    assert [(r["config"], r["metric"], r["Method"]) for r in rows] == [
        ("exp4", "image_auroc", MODEL), ("exp4", "pixel_auroc", MODEL)]
    for row in rows:
        key = row["metric"]
        for column, group in (("All", "all"), ("High", "high"), ("Low", "low")):
            assert row[column] == expected_cell([m["summary"][group][key] for m in metrics]), column
        for name in ("alpha", "beta"):
            assert row[name] == expected_cell([m["per_class"][name][key] for m in metrics]), name

    table, notes = invoke("leaderboard", runs)
    det = expected_cell([m["summary"]["all"]["image_auroc"] for m in metrics])
    assert f"| exp4 | Det. | {det} |" in table.splitlines()
    assert (f"Note: {MODEL} on folder/exp4: mean ± sample standard deviation (ddof=1) over n=3 runs "
            "(split seeds 0, 1, 2; run seed 0)") in notes

    # another run seed on split seed 0 is one more repeat of the same configuration
    invoke("run", "--model", MODEL, "--split", tmp_path / "X0.csv", "--root", root, "--out", runs,
           "--device", "cpu", "--overlays", "0", "--seed", "1")
    board = build_leaderboard(runs)
    assert "(split seeds 0, 1, 2; run seeds 0, 1)" in board.notes[-1] and "n=4" in board.notes[-1]
    assert board.tables[0].rows[0][2].endswith("(n=4)")


def write_run(runs: Path, split: str, stamp: str, values: dict[str, float | None], seed: int = 0,
              epochs: int = 2, fingerprint: str = "f1") -> Path:
    """A run directory as `ltbench run` writes it: metrics.json (classes a: high, b: low) and config.json."""
    run_dir = runs / "mean" / split.replace("/", "-") / stamp
    run_dir.mkdir(parents=True)
    per_class = {"a": {"group": "high", **{k: 0.9 for k in METRIC_KEYS}},
                 "b": {"group": "low", **{k: values["b"] for k in METRIC_KEYS}}}
    summary = {g: {k: values[g] for k in METRIC_KEYS} for g in ("all", "high", "low")}
    (run_dir / "metrics.json").write_text(json.dumps(
        {"model": "mean", "split": split, "per_class": per_class, "summary": summary}))
    (run_dir / "config.json").write_text(json.dumps(
        {"model": "mean", "split": split, "seed": seed, "config": {"epochs": epochs, "seed": seed},
         "source_fingerprint": fingerprint, "manifest_csv_sha256": f"sha-{split}"}))
    return run_dir


def values(low: float | None) -> dict[str, float | None]:
    return {"all": None if low is None else (0.9 + low) / 2, "high": 0.9, "low": low, "b": low}


def test_only_runs_of_one_setting_are_grouped(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "synth/exp100", "20300101-000000", values(0.70))
    write_run(runs, "synth/exp100-seed1", "20300101-000001", values(0.80))
    write_run(runs, "synth/exp100", "20300101-000002", values(0.60), seed=3)   # another run seed: a repeat
    write_run(runs, "synth/exp100-seed2", "20291231-000000", values(0.10), epochs=5)  # another config: left out
    write_run(runs, "synth/exp100-reverse", "20300101-000000", values(0.50))  # another recipe: its own row
    board = build_leaderboard(runs, per_class=True)
    image = next(t for t in board.tables if t.keys == {"dataset": "synth", "config": "exp100", "metric": "image_auroc"})
    assert image.rows == [["mean", expected_cell([0.80, 0.85, 0.75]), "90.00 ± 0.00 (n=3)",
                           expected_cell([0.60, 0.70, 0.80]), "90.00 ± 0.00 (n=3)", expected_cell([0.60, 0.70, 0.80])]]
    reverse = next(t for t in board.tables if t.keys["config"] == "exp100-reverse")
    assert reverse.rows[0][:4] == ["mean", "70.00", "90.00", "50.00"]  # one run: the single-run display
    assert any("left out 1 run(s) with another detector configuration or file list" in n and "20291231-000000" in n
               for n in board.notes)
    assert "(split seeds 0, 1; run seeds 0, 3)" in " ".join(board.notes)
    # the CSV carries the same cells
    assert expected_cell([0.60, 0.70, 0.80]) in render_csv(board)

    # a split drawn from another file list (fingerprint) is not a repeat either: the latest setting is shown
    write_run(runs, "synth/exp100-seed4", "20300102-000000", values(0.20), fingerprint="f2")
    board = build_leaderboard(runs, per_class=True)
    image = next(t for t in board.tables if t.keys == {"dataset": "synth", "config": "exp100", "metric": "image_auroc"})
    assert image.rows[0][3] == "20.00"
    assert any("left out 4 run(s)" in n for n in board.notes)


def test_a_value_missing_in_one_run_is_na_never_imputed(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "synth/exp100", "20300101-000000", values(0.70))
    write_run(runs, "synth/exp100-seed1", "20300101-000001", values(None))
    (table,) = build_leaderboard(runs).tables
    assert table.rows[0] == ["exp100", "Det.", "N/A"]


def test_aggregate_against_numpy():
    data = [0.7231, 0.6912, 0.7544]
    stat = aggregate(data)
    assert stat.n == 3 and stat.mean == pytest.approx(np.mean(data), abs=1e-15)
    assert stat.std == pytest.approx(np.std(data, ddof=1), abs=1e-15)
    assert format_stat(aggregate([0.7231])) == "72.31" and aggregate([0.5, float("nan")]) is None
    assert aggregate([]) is None and format_stat(None) == "N/A"
