"""`ltbench run` / `ltbench predict` end to end on a tiny MVTec-layout split, with a detector defined in the tests."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ltbench.cli import main
from ltbench.data import load_image
from ltbench.datasets.folder import read_catalog
from ltbench.metrics import METRIC_KEYS
from ltbench.results import select_overlays
from ltbench.run_config import choose_preset
from ltbench.runner import DEFAULT_SPLIT, RunOptions, run
from ltbench.splits import build_split
from tests.fakes import SPOT_BAD as N_BAD
from tests.fakes import SPOT_CLASSES as CLASSES
from tests.fakes import SPOT_GOOD as N_GOOD
from tests.fakes import make_spot_tree as make_tree

TESTS = Path(__file__).resolve().parent
MODEL = "tests.mean_detector:MeanDetector"
SHIFTED = "tests.mean_detector:ShiftedMeanDetector"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS.parent))  # so that tests.mean_detector imports
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("MEAN_DETECTOR_STOP_AFTER", raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tree root, manifest CSV path) of a 2-class exp split with beta 2."""
    base = tmp_path_factory.mktemp("tiny")
    root = make_tree(base / "data")
    manifest = build_split(read_catalog(root), "exp", 2)
    manifest.write(base / "split" / "tiny.csv")
    step = build_split(read_catalog(root), "step", 2)
    step.write(base / "split" / "tiny_step.csv")
    return root, base / "split" / "tiny.csv"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_args(tiny, out: Path, *extra: str, model: str = MODEL) -> list[str]:
    root, manifest = tiny
    return ["run", "--model", model, "--split", str(manifest), "--root", str(root), "--out", str(out),
            "--device", "cpu", *extra]


def run_dirs(out: Path) -> list[Path]:
    """Finished run directories under `out` (hidden partial folders excluded)."""
    return sorted(p.parent for p in out.rglob("metrics.json") if not any(s.startswith(".") for s in p.parts))


def one_error_line(result) -> str:
    """The CLI reported a library error: exit 1 and exactly one `Error:` line (no traceback)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """One uninterrupted run of the test detector; returns (out folder, run dir, CLI output)."""
    out = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(TESTS.parent))
    mp.setenv("TQDM_DISABLE", "1")
    try:
        result = invoke(*run_args(tiny, out))
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(out)
    return out, run_dir, result.output


def _auroc(scores: list[float], labels: list[int]) -> float:
    """Mann-Whitney AUROC, ties counted half: an independent reference."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ----------------------------------------------------------------------------- a full run


def test_run_writes_the_run_directory(tiny, finished):
    out, run_dir, output = finished
    assert run_dir.parent == out / "tests.mean_detector.MeanDetector" / "folder-exp2"
    assert {p.name for p in run_dir.iterdir()} == {
        "config.json", "model", "metrics.json", "per_class.csv", "scores.csv", "maps", "log.txt", "report.html"}
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")]  # no partial left behind

    record = json.loads((run_dir / "config.json").read_text())
    assert record["model"] == MODEL and record["detector"] == MODEL and record["split"] == "folder/exp2"
    assert record["preset"] == "paper"                      # not a synth split: the "paper" preset
    assert record["config"] == {"epochs": 3, "grid": 16, "batch_size": 4}
    assert record["seed"] == 0 and record["device"] == "cpu" and record["command"].startswith(
        f"ltbench run --model {MODEL} --split {tiny[1]} --root {tiny[0]}")
    assert record["manifest_csv_sha256"] == json.loads(tiny[1].with_suffix(".json").read_text())["csv_sha256"]
    assert {"python", "torch", "numpy"} <= set(record["versions"])
    assert record["class_order"] == ["alpha", "beta"] and record["high"] == ["alpha"] and record["low"] == ["beta"]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics) == ["model", "split", "per_class", "summary"]
    assert metrics["model"] == MODEL and metrics["split"] == "folder/exp2"
    assert list(metrics["per_class"]) == ["alpha", "beta"] and list(metrics["summary"]) == ["all", "high", "low"]
    assert metrics["per_class"]["alpha"]["group"] == "high" and metrics["per_class"]["beta"]["group"] == "low"
    for values in metrics["summary"].values():
        assert set(values) == set(METRIC_KEYS)

    # scores.csv: one row per test image; the image AUROC recomputed from it matches metrics.json
    with open(run_dir / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["class_name", "image", "label", "defect_type", "score"]
    assert len(rows) == len(CLASSES) * (N_GOOD + N_BAD)
    for name in CLASSES:
        mine = [r for r in rows if r["class_name"] == name]
        assert {r["defect_type"] for r in mine} == {"good", "spot"}
        auroc = _auroc([float(r["score"]) for r in mine], [int(r["label"]) for r in mine])
        assert metrics["per_class"][name]["image_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert metrics["summary"]["all"]["image_auroc"] == pytest.approx(
        np.mean([metrics["per_class"][c]["image_auroc"] for c in CLASSES]))
    assert metrics["summary"]["high"]["pixel_auroc"] == pytest.approx(metrics["per_class"]["alpha"]["pixel_auroc"])
    assert metrics["per_class"]["alpha"]["image_auroc"] == 1.0  # the bright square is far from the class mean

    with open(run_dir / "per_class.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["class_name"] for r in table] == ["alpha", "beta"]
    assert float(table[1]["pixel_auroc"]) == pytest.approx(metrics["per_class"]["beta"]["pixel_auroc"])

    # the saved model reproduces the scores
    sys.path.insert(0, str(TESTS.parent))
    try:
        from tests.mean_detector import MeanDetector
    finally:
        sys.path.remove(str(TESTS.parent))
    detector = MeanDetector.load(run_dir / "model")
    first = rows[0]
    prediction = detector.predict(load_image(tiny[0] / first["image"])[None], torch.tensor([0]))
    assert float(prediction.image_scores[0]) == pytest.approx(float(first["score"]), rel=1e-6)

    # three overlays per class: image | ground truth | heat map side by side
    for name in CLASSES:
        pngs = sorted((run_dir / "maps" / name).glob("*.png"))
        assert len(pngs) == 3
        assert sum(p.name.startswith("spot_") for p in pngs) == 2 and sum(p.name.startswith("good_") for p in pngs) == 1
        with Image.open(pngs[0]) as overlay:
            assert overlay.format == "PNG" and overlay.width > 2 * overlay.height
    assert set(json.loads((run_dir / "maps" / "value_ranges.json").read_text())) == set(CLASSES)

    log = (run_dir / "log.txt").read_text()
    assert "Preset: paper" in log and "Device: cpu (from --device)" in log and "Results:" in log
    assert "Image AUROC" in output or "image" in output.lower()  # the High/Low/All table was printed
    assert f"Run directory: {run_dir}" in output


def test_printed_defaults_and_summary_table(finished):
    _, run_dir, output = finished
    from ltbench.metrics import Evaluation

    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluation = Evaluation(per_class=metrics["per_class"], summary=metrics["summary"])
    assert evaluation.format_summary() in output
    for line in ("Split: folder/exp2 (from --split)", "Preset: paper (default off the synthetic set)",
                 "Device: cpu (from --device)", "Seed: 0"):
        assert line in output


def test_resume_after_interrupt_gives_the_same_metrics(tiny, finished, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    monkeypatch.setenv("MEAN_DETECTOR_STOP_AFTER", "1")
    interrupted = invoke(*run_args(tiny, out))
    assert interrupted.exit_code == 130 and "Interrupted." in interrupted.output
    assert run_dirs(out) == []
    (partial,) = (out / "tests.mean_detector.MeanDetector" / "folder-exp2").iterdir()
    assert partial.name.startswith(".") and partial.name.endswith(".partial")
    assert json.loads((partial / "checkpoints" / "progress.json").read_text()) == {"epochs_done": 1}
    assert f"--resume {partial}" in interrupted.output  # the user is told how to continue

    monkeypatch.delenv("MEAN_DETECTOR_STOP_AFTER")
    final_path = partial.parent / partial.name[1:-len(".partial")]
    resumed = invoke("run", "--model", MODEL, "--root", tiny[0], "--resume", final_path, "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    assert "Split: folder/exp2 (from the resumed run)" in resumed.output
    assert run_dirs(out) == [final_path] and not partial.exists()
    reference = finished[1]
    assert json.loads((final_path / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert (final_path / "scores.csv").read_text() == (reference / "scores.csv").read_text()
    log = (final_path / "log.txt").read_text()
    assert "Run stopped (KeyboardInterrupt" in log and "Resuming" in log


def test_two_runs_in_the_same_second_never_overwrite(tiny, tmp_path, monkeypatch):
    import ltbench.rundir as rundir_module

    class FrozenClock:
        @staticmethod
        def now():
            from datetime import datetime

            return datetime(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(rundir_module, "datetime", FrozenClock)
    out = tmp_path / "runs"
    options = RunOptions(model=MODEL, split=str(tiny[1]), root=str(tiny[0]), out=out, device="cpu",
                         set_values=("epochs=1",), overlays_per_class=0, progress=False)
    first, second = run(options), run(options)
    assert first.run_dir.name == "20300102-030405" and second.run_dir.name == "20300102-030405-1"
    assert first.run_dir != second.run_dir and len(run_dirs(out)) == 2
    assert json.loads((first.run_dir / "config.json").read_text())["config"]["epochs"] == 1


def test_predict_scores_new_images_like_the_run(tiny, finished, tmp_path):
    root, _ = tiny
    _, run_dir, _ = finished
    images = [root / "beta" / "test" / "spot" / "001.png", root / "beta" / "test" / "good" / "000.png"]
    out = tmp_path / "pred"
    result = invoke("predict", run_dir, *images, "--class", "beta", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(run_dir / "scores.csv", newline="") as handle:
        in_run = {r["image"]: float(r["score"]) for r in csv.DictReader(handle)}
    assert [Path(r["image"]) for r in rows] == images and {r["class_name"] for r in rows} == {"beta"}
    for row, image in zip(rows, images):
        assert float(row["score"]) == pytest.approx(in_run[image.relative_to(root).as_posix()], rel=1e-9)
        assert Path(row["overlay"]).is_file()
    assert float(rows[0]["score"]) > float(rows[1]["score"])  # the anomalous image scores higher

    wrong = invoke("predict", run_dir, *images, "--class", "gamma", "--out", tmp_path / "x")
    assert "'gamma' is not a class" in one_error_line(wrong) and "alpha, beta" in wrong.output
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- choices


def test_default_split_and_presets(monkeypatch, tmp_path):
    import ltbench.runner as runner_module

    seen = []

    def fake_open(split, root):
        seen.append(split)
        from ltbench.errors import SplitError

        raise SplitError("stop here")

    monkeypatch.setattr(runner_module, "open_run_split", fake_open)
    result = invoke("run", "--model", MODEL, "--out", tmp_path)
    assert seen == [DEFAULT_SPLIT] == ["synth/exp100"] and one_error_line(result) == "Error: stop here"
    assert not any(tmp_path.iterdir())

    from tests.mean_detector import MeanDetector, NoSaveDetector

    assert choose_preset(MeanDetector, "synth/exp100", None)[:2] == ("quick", {"epochs": 2})
    assert choose_preset(MeanDetector, "mvtec/exp100", None)[:2] == ("paper", {"epochs": 3})
    assert choose_preset(MeanDetector, "mvtec/exp100", "quick")[:2] == ("quick", {"epochs": 2})
    assert choose_preset(NoSaveDetector, "synth/exp100", None)[0] is None


def test_overlay_selection_prefers_top_anomalies_and_the_top_normal():
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.2, 0.1, 0.8, 0.5])
    assert select_overlays(labels, scores, 3) == [3, 4, 0]
    assert select_overlays(labels, scores, 0) == []
    assert select_overlays(np.array([0, 0]), np.array([0.1, 0.3]), 3) == [1, 0]


# ----------------------------------------------------------------------------- bad input


def _no_run_dirs(out: Path) -> None:
    assert run_dirs(out) == []
    assert not [p for p in out.rglob("*") if p.is_dir() and not p.name.startswith(".")
                and not any(part.startswith(".") for part in p.relative_to(out).parts)
                and (p / "config.json").exists()]


def test_unknown_model_lists_the_known_ones(tiny, tmp_path):
    line = one_error_line(invoke(*run_args(tiny, tmp_path, model="nope")))
    assert line.startswith("Error: unknown model 'nope'; known models: ") and "ltad" in line and "uniad" in line
    assert not tmp_path.joinpath("nope").exists() and not any(tmp_path.iterdir())


def test_class_missing_a_contract_member(tiny, tmp_path):
    line = one_error_line(invoke(*run_args(tiny, tmp_path, model="tests.mean_detector:NoSaveDetector")))
    assert "does not meet the contract: missing 'save'" in line
    assert not any(tmp_path.iterdir())


def test_split_files_missing_under_the_root(tiny, tmp_path):
    root = shutil.copytree(tiny[0], tmp_path / "data")
    (root / "beta" / "train" / "good" / "000.png").unlink()
    out = tmp_path / "runs"
    line = one_error_line(invoke(*run_args((root, tiny[1]), out)))
    assert "missing" in line and "beta/train/good/000.png" in line
    assert not out.exists()


def test_unknown_set_key_lists_the_valid_keys(tiny, tmp_path):
    line = one_error_line(invoke(*run_args(tiny, tmp_path, "--set", "epocs=2")))
    assert line == "Error: unknown --set key 'epocs' for MeanConfig; valid keys: batch_size, epochs, grid"
    line = one_error_line(invoke(*run_args(tiny, tmp_path, "--set", "epochs=two")))
    assert "epochs" in line and "expected an integer" in line
    assert not any(tmp_path.iterdir())


def test_unknown_preset_and_bad_config_file(tiny, tmp_path):
    line = one_error_line(invoke(*run_args(tiny, tmp_path, "--preset", "huge")))
    assert "unknown preset 'huge'" in line and "paper, quick" in line
    bad = tmp_path / "bad.json"
    bad.write_text('{"grid": 8, "colour": 1}')
    line = one_error_line(invoke(*run_args(tiny, tmp_path / "runs", "--config", bad)))
    assert "unknown config key 'colour'" in line
    assert not (tmp_path / "runs").exists()


def test_usage_errors_exit_2(tiny, tmp_path):
    assert invoke("run", "--split", tiny[1]).exit_code == 2                      # --model missing
    assert invoke(*run_args(tiny, tmp_path, "--device", "tpu")).exit_code == 2
    assert invoke(*run_args(tiny, tmp_path, "--seed", "x")).exit_code == 2


def test_resume_of_another_model_or_split(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MEAN_DETECTOR_STOP_AFTER", "1")
    out = tmp_path / "runs"
    assert invoke(*run_args(tiny, out)).exit_code == 130
    monkeypatch.delenv("MEAN_DETECTOR_STOP_AFTER")
    (partial,) = (out / "tests.mean_detector.MeanDetector" / "folder-exp2").iterdir()

    line = one_error_line(invoke(*run_args(tiny, out, "--resume", partial, model=SHIFTED)))
    assert MODEL in line and SHIFTED in line
    step = tiny[1].with_name("tiny_step.csv")
    line = one_error_line(invoke("run", "--model", MODEL, "--split", step, "--root", tiny[0], "--resume", partial))
    assert "folder/exp2" in line and str(step) in line
    line = one_error_line(invoke(*run_args(tiny, out, "--resume", partial, "--set", "epochs=5")))
    assert "--resume" in line and "epochs" in line
    line = one_error_line(invoke(*run_args(tiny, out, "--resume", tmp_path / "nothing")))
    assert "no interrupted run" in line
    assert partial.is_dir() and run_dirs(out) == []  # the interrupted run is still resumable


def test_corrupt_test_image_names_the_file_and_keeps_the_run_resumable(tiny, tmp_path):
    root = shutil.copytree(tiny[0], tmp_path / "data")
    broken = root / "beta" / "test" / "good" / "001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    out = tmp_path / "runs"
    line = one_error_line(invoke(*run_args((root, tiny[1]), out)))
    assert str(broken) in line and "corrupt or truncated" in line and "--resume" in line
    assert run_dirs(out) == []
    (partial,) = (out / "tests.mean_detector.MeanDetector" / "folder-exp2").iterdir()
    assert (partial / "model" / "model.safetensors").is_file()  # training finished before predict failed

    shutil.copy(tiny[0] / "beta" / "test" / "good" / "001.png", broken)  # fix the file, then resume
    resumed = invoke("run", "--model", MODEL, "--root", root, "--resume", partial)
    assert resumed.exit_code == 0, resumed.output
    assert "Training had finished" in resumed.output
    assert len(run_dirs(out)) == 1


def test_truncated_training_image_names_the_file(tiny, tmp_path):
    root = shutil.copytree(tiny[0], tmp_path / "data")
    broken = root / "alpha" / "train" / "good" / "002.png"
    broken.write_bytes(broken.read_bytes()[:200])
    out = tmp_path / "runs"
    line = one_error_line(invoke(*run_args((root, tiny[1]), out)))
    assert str(broken) in line
    assert run_dirs(out) == []


def test_mask_size_differs_from_its_image(tiny, tmp_path):
    root = shutil.copytree(tiny[0], tmp_path / "data")
    mask = root / "alpha" / "ground_truth" / "spot" / "002_mask.png"
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(mask)
    out = tmp_path / "runs"
    line = one_error_line(invoke(*run_args((root, tiny[1]), out, "--set", "epochs=1")))
    assert str(mask) in line and "20x20" in line and "32x32" in line
    assert run_dirs(out) == []


def test_leaderboard_of_two_runs(tiny, finished, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(finished[0], runs)
    result = invoke(*run_args(tiny, runs, "--overlays", "0", model=SHIFTED))
    assert result.exit_code == 0, result.output
    summaries = {}
    for run_dir in run_dirs(runs):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        summaries[metrics["model"]] = metrics
    assert sorted(summaries) == [MODEL, SHIFTED]

    board = invoke("leaderboard", runs)
    assert board.exit_code == 0, board.output
    lines = [line for line in board.output.splitlines() if line.startswith("|")]
    assert lines[0] == f"| Config. | Task | {MODEL} | {SHIFTED} |"
    assert len(lines) == 2 + 2  # header, rule, Det., Seg.
    for line, key in zip(lines[2:], ("image_auroc", "pixel_auroc")):
        expected = [f"{100 * summaries[m]['summary']['all'][key]:.2f}" for m in (MODEL, SHIFTED)]
        assert line == f"| exp2 | {'Det.' if key == 'image_auroc' else 'Seg.'} | {' | '.join(expected)} |"

    per_class = invoke("leaderboard", runs, "--per-class", "--format", "csv")
    rows = list(csv.DictReader(per_class.output.splitlines()))
    assert [(r["metric"], r["Method"]) for r in rows] == [
        ("image_auroc", MODEL), ("image_auroc", SHIFTED), ("pixel_auroc", MODEL), ("pixel_auroc", SHIFTED)]
    for row in rows:
        metrics = summaries[row["Method"]]
        assert row["High"] == f"{100 * metrics['summary']['high'][row['metric']]:.2f}"
        assert row["beta"] == f"{100 * metrics['per_class']['beta'][row['metric']]:.2f}"


def test_resume_of_a_finished_run_and_cuda_without_a_gpu(tiny, finished, tmp_path, monkeypatch):
    line = one_error_line(invoke(*run_args(tiny, tmp_path, "--resume", finished[1])))
    assert f"{finished[1]} is a finished run; there is nothing to resume" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("run", "--model", MODEL, "--split", tiny[1], "--root", tiny[0], "--out", tmp_path,
                    "--device", "cuda")
    assert "--device cuda: no CUDA device is available" in one_error_line(result)
    assert not any(tmp_path.iterdir())


def test_seed_reaches_the_detector_config_and_defaults_to_it(tiny, monkeypatch):
    from ltbench.runner import RunLog, _plan

    monkeypatch.syspath_prepend(str(TESTS.parent))
    root, manifest = tiny
    model = "tests.mean_detector:SeededMeanDetector"
    given = _plan(RunOptions(model=model, split=str(manifest), root=str(root), seed=5), RunLog(None))
    assert (given.config.seed, given.record["seed"], given.record["config"]["seed"]) == (5, 5, 5)
    default = _plan(RunOptions(model=model, split=str(manifest), root=str(root)), RunLog(None))
    assert (default.config.seed, default.record["seed"]) == (7, 7)
    overridden = _plan(RunOptions(model=model, split=str(manifest), root=str(root), seed=5,
                                  set_values=("seed=9",)), RunLog(None))
    assert (overridden.config.seed, overridden.record["seed"]) == (9, 5)


def test_model_messages_reach_the_log_and_diagnostics_reach_metrics_json(tiny, tmp_path):
    result = invoke(*run_args(tiny, tmp_path, model="tests.mean_detector:ReportingMeanDetector"))
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path)
    log = (run_dir / "log.txt").read_text()
    assert "fit saw" in log and "Warning: the test warning" in log
    assert "Warning: the test warning" in result.output  # shown to the user once, through the run's log
    document = json.loads((run_dir / "metrics.json").read_text())
    assert document["diagnostics"] == {"train_images_seen": 1, "note": "from the detector"}
