"""`ltbench leaderboard`: the paper's table layouts, latest run per (model, split), published numbers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ltbench.cli import main
from ltbench.leaderboard import PAPER_RESULTS, build_leaderboard, collect_runs, render_csv, render_markdown
from ltbench.metrics import METRIC_KEYS

CLASSES = {"weave": "high", "disc": "high", "tiles": "low", "nut": "low", "grain": "low"}


def metrics(model: str, split: str, offset: float) -> dict:
    """A metrics.json document whose values are easy to check: class i has image AUROC 0.5 + offset + i/100."""
    per_class = {}
    for i, (name, group) in enumerate(CLASSES.items()):
        values = {key: 0.5 + offset + i / 100 for key in METRIC_KEYS}
        values["pixel_auroc"] = 0.9 - i / 100
        per_class[name] = {"group": group, **values}

    def mean(group: str | None, key: str) -> float:
        chosen = [v[key] for v in per_class.values() if group is None or v["group"] == group]
        return sum(chosen) / len(chosen)

    summary = {g: {key: mean(None if g == "all" else g, key) for key in METRIC_KEYS} for g in ("all", "high", "low")}
    return {"model": model, "split": split, "per_class": per_class, "summary": summary}


def write_run(runs: Path, model: str, split: str, stamp: str, offset: float) -> Path:
    run_dir = runs / model / split.replace("/", "-") / stamp
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics(model, split, offset)))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "uniad", "synth/exp100", "20300101-000000", 0.10)
    write_run(runs, "uniad", "synth/exp100", "20300101-000000-1", 0.20)   # the latest uniad run on exp100
    write_run(runs, "uniad", "synth/exp100", "20291231-235959", 0.30)     # older
    write_run(runs, "ltad", "synth/exp100", "20300101-000000", 0.25)
    write_run(runs, "ltad", "synth/step100", "20300101-000000", 0.05)
    partial = runs / "ltad" / "synth-step100" / ".20300102-000000.partial"  # unfinished: never counted
    partial.mkdir()
    (partial / "metrics.json").write_text(json.dumps(metrics("ltad", "synth/step100", 0.4)))
    write_run(runs, "ltad", "mvtec/exp100", "20300101-000000", 0.30)
    return runs


def test_latest_run_per_model_and_split(runs):
    entries, notes = collect_runs(runs)
    assert [(e.split, e.model) for e in entries] == [
        ("mvtec/exp100", "ltad"), ("synth/exp100", "ltad"), ("synth/exp100", "uniad"), ("synth/step100", "ltad")]
    uniad = entries[2]
    assert uniad.run_dir.name == "20300101-000000-1"
    assert notes == [f"uniad on synth/exp100: using the latest of 3 runs ({uniad.run_dir})"]
    assert [e.split for e in collect_runs(runs, dataset="mvtec")[0]] == ["mvtec/exp100"]


def test_summary_layout_rows_configurations_by_task_columns_methods(runs):
    board = build_leaderboard(runs, dataset="synth")
    (table,) = board.tables
    assert table.keys == {"dataset": "synth"}
    assert table.columns == ["Config.", "Task", "UniAD", "LTAD"]  # the paper's names and column order
    # All = mean over the five classes: image AUROC 0.5 + offset + 0.02, pixel AUROC 0.88
    assert table.rows == [
        ["exp100", "Det.", "72.00", "77.00"],
        ["exp100", "Seg.", "88.00", "88.00"],
        ["step100", "Det.", "N/A", "57.00"],
        ["step100", "Seg.", "N/A", "88.00"],
    ]
    text = render_markdown(board)
    assert text.splitlines()[2:5] == ["| Config. | Task | UniAD | LTAD |", "|---|---|---:|---:|",
                                      "| exp100 | Det. | 72.00 | 77.00 |"]


def test_per_class_layout_follows_the_supplementary_tables(runs):
    board = build_leaderboard(runs, dataset="synth", per_class=True)
    assert [(t.keys["config"], t.keys["metric"]) for t in board.tables] == [
        ("exp100", "image_auroc"), ("exp100", "pixel_auroc"), ("step100", "image_auroc"), ("step100", "pixel_auroc")]
    image = board.tables[0]
    assert image.columns == ["Method", "All", "High", "Low", *CLASSES]
    # uniad (offset 0.2): classes 70, 71, 72, 73, 74; High = mean(70, 71), Low = mean(72, 73, 74)
    assert image.rows[0] == ["UniAD", "72.00", "70.50", "73.00", "70.00", "71.00", "72.00", "73.00", "74.00"]
    assert image.rows[1][0] == "LTAD" and image.rows[1][1] == "77.00"
    pixel = board.tables[1]
    assert pixel.rows[0] == ["UniAD", "88.00", "89.50", "87.00", "90.00", "89.00", "88.00", "87.00", "86.00"]


def _paper(dataset: str, config: str, method: str, metric: str, group: str, tables: tuple[str, ...]) -> float:
    with open(PAPER_RESULTS, newline="") as handle:
        for row in csv.DictReader(handle):
            if (row["dataset"], row["config"], row["method"], row["metric"], row["group"]) == \
                    (dataset, config, method, metric, group) and row["source_table"].strip() in tables:
                return float(row["value"])
    raise KeyError((dataset, config, method, metric, group))


def test_with_paper_reproduces_table_3_without_runs(tmp_path):
    board = build_leaderboard(tmp_path / "none", dataset="mvtec", with_paper=True)
    (table,) = board.tables
    assert table.columns == ["Config.", "Task", "Cut & Paste (reported)", "MKD (reported)", "DRAEM (reported)",
                             "RegAD (reported)", "UniAD (reported)", "AnomalyGPT (reported)",
                             "LTAD w/o SAD (reported)", "LTAD (reported)"]
    assert [row[:2] for row in table.rows] == [[c, t] for c in ("exp100", "exp200", "step100", "step200")
                                              for t in ("Det.", "Seg.")]
    # Table 3 as printed: exp100 Det. 75.89 ... 88.86; Cut & Paste has no segmentation; RegAD N/A on exp200
    assert table.rows[0][2:] == ["75.89", "78.92", "79.57", "82.43", "87.70", "87.44", "88.74", "88.86"]
    assert table.rows[1][2] == "N/A" and table.rows[2][5] == "N/A"
    assert table.rows[7][-1] == f"{_paper('mvtec', 'step200', 'ltad', 'pixel_auroc', 'all', ('Table 3',)):.2f}"


def test_with_paper_beside_runs_and_per_class(runs):
    board = build_leaderboard(runs, dataset="mvtec", with_paper=True)
    (table,) = board.tables
    assert table.columns[:3] == ["Config.", "Task", "LTAD"] and table.columns[-1] == "LTAD (reported)"
    assert table.rows[0][:3] == ["exp100", "Det.", "82.00"] and table.rows[0][-1] == "88.86"
    assert table.rows[2][2] == "N/A"  # exp200: no run, published numbers only

    board = build_leaderboard(runs, dataset="mvtec", per_class=True, with_paper=True)
    image = board.tables[0]
    assert image.keys == {"dataset": "mvtec", "config": "exp100", "metric": "image_auroc"}
    assert image.columns[4:] == list(CLASSES)  # the run's classes, in its order
    reported = {row[0]: row for row in image.rows}
    # Table 10, "Ours": All 88.86, HighShot 99.09, LowShot 79.90 (class columns absent from this run are dropped)
    assert reported["LTAD (reported)"][1:4] == ["88.86", "99.09", "79.90"]
    assert reported["Cut & Paste (reported)"][1:4] == ["75.89", "85.79", "67.23"]
    assert set(reported["LTAD (reported)"][4:]) == {"N/A"}


def test_per_class_with_paper_only_uses_the_papers_classes(tmp_path):
    board = build_leaderboard(tmp_path / "none", dataset="visa", per_class=True, with_paper=True)
    first = board.tables[0]
    assert first.keys == {"dataset": "visa", "config": "exp100", "metric": "image_auroc"}
    assert first.columns[4:8] == ["pcb3", "pcb2", "pcb1", "pcb4"] and len(first.columns) == 4 + 12
    ltad = next(row for row in first.rows if row[0] == "LTAD (reported)")
    assert ltad[4] == f"{_paper('visa', 'exp100', 'ltad', 'image_auroc', 'pcb3', ('Table 18',)):.2f}"


def test_csv_has_key_columns_and_the_same_values(runs):
    board = build_leaderboard(runs)
    rows = list(csv.reader(io.StringIO(render_csv(board))))
    assert rows[0] == ["dataset", "Config.", "Task", "LTAD", "UniAD"]
    assert ["synth", "exp100", "Det.", "77.00", "72.00"] in rows and ["mvtec", "exp100", "Det.", "82.00", ""] in rows
    assert len(rows) == 1 + 2 + 4  # mvtec: 1 config x 2 tasks; synth: 2 configs x 2 tasks


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_leaderboard(runs):
    result = invoke("leaderboard", runs, "--dataset", "synth")
    assert result.exit_code == 0, result.output
    assert "| exp100 | Det. | 72.00 | 77.00 |" in result.output
    assert "Note: uniad on synth/exp100: using the latest of 3 runs" in result.output
    result = invoke("leaderboard", runs, "--format", "csv", "--per-class", "--dataset", "synth")
    assert result.exit_code == 0 and "dataset,config,metric,Method,All,High,Low,weave" in result.output


def test_cli_leaderboard_errors(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("leaderboard", empty)
    assert result.exit_code == 1 and result.output.startswith(f"Error: no finished runs under {empty}")
    result = invoke("leaderboard", tmp_path / "missing")
    assert result.exit_code == 1 and "does not exist" in result.output
    assert invoke("leaderboard", runs, "--format", "xls").exit_code == 2
    broken = runs / "x" / "synth-exp100" / "20300101-000000"
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text("{")
    result = invoke("leaderboard", runs)
    assert result.exit_code == 1 and str(broken / "metrics.json") in result.output


def test_importing_the_leaderboard_does_not_import_torch() -> None:
    # `ltbench leaderboard` reads JSON files; loading torch (seconds, GBs on some machines) would be waste.
    import subprocess
    import sys

    code = ("import sys, ltbench.leaderboard, ltbench.rundir; "
            "print(','.join(sorted(m for m in ('torch', 'numpy', 'ltbench.runner') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
