"""Detection-only detectors and classes a detector cannot score: contract, evaluation, run files, leaderboard.

DESIGN.md, "The detector contract": pixel metrics of a detection-only run are null (N/A when
printed); a class the detector cannot score has null metrics and makes every mean that
includes it null, and the run names it. Nothing is imputed.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ltbench.cli import main
from ltbench.datasets.base import ANOMALY, NORMAL, Record
from ltbench.datasets.folder import read_catalog
from ltbench.detector import Prediction, check_prediction, check_uniform, unscorable_classes
from ltbench.errors import DetectorError, MetricError
from ltbench.evaluation import aggregate, evaluate
from ltbench.metrics import IMAGE_KEYS, METRIC_KEYS, PIXEL_KEYS, roc_auc
from ltbench.splits import build_split
from ltbench.testing import TensorTrainSet, check_detector, pattern_images
from tests.fakes import SPOT_BAD, SPOT_GOOD, make_spot_tree
from tests.mean_detector import (
    DetectionOnlyMeanDetector,
    InconsistentMapsDetector,
    MeanDetector,
    PickyMeanDetector,
)

TESTS = Path(__file__).resolve().parent
DETECTION_ONLY = "tests.mean_detector:DetectionOnlyMeanDetector"
PICKY = "tests.mean_detector:PickyMeanDetector"
INCONSISTENT = "tests.mean_detector:InconsistentMapsDetector"
N_TEST = SPOT_GOOD + SPOT_BAD  # test images per class


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS.parent))  # so that tests.mean_detector imports
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tree root, manifest CSV) of the 2-class spot tree as exp6: alpha keeps 6 training images, beta 1."""
    base = tmp_path_factory.mktemp("tiny")
    root = make_spot_tree(base / "data")
    manifest = build_split(read_catalog(root), "exp", 6)
    assert manifest.counts == {"alpha": 6, "beta": 1} and manifest.high == ["alpha"] and manifest.low == ["beta"]
    path = base / "split" / "exp6.csv"
    manifest.write(path)
    return root, path


def invoke(*args) -> any:
    return CliRunner().invoke(main, [str(a) for a in args])


def run_model(tiny, out: Path, model: str, *extra) -> tuple[Path, str]:
    """Run `model` on the tiny split with the CLI; returns (run directory, output)."""
    root, manifest = tiny
    result = invoke("run", "--model", model, "--split", manifest, "--root", root, "--out", out, "--device", "cpu",
                    *extra)
    assert result.exit_code == 0, result.output
    (metrics_file,) = [p for p in out.rglob("metrics.json") if not any(s.startswith(".") for s in p.parts)]
    return metrics_file.parent, result.output


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def summary_row(output: str, group: str) -> list[str]:
    """The cells of the printed All/High/Low table's row for `group` ("All", "High", "Low")."""
    (line,) = [line for line in output.splitlines() if line.startswith(f"{group} (")]
    return line.split()[2:]  # drop "All (2)"


# ----------------------------------------------------------------------------- the contract


def test_check_prediction_accepts_missing_maps_but_not_both_missing() -> None:
    scores, maps = check_prediction(Prediction(torch.ones(2), None), 2, "Det")
    assert maps is None and torch.equal(scores, torch.ones(2))
    with pytest.raises(DetectorError, match="Det.predict returned neither"):
        check_prediction(Prediction(None, None), 2, "Det")
    assert check_uniform([True, True], "anomaly_maps", "Det") is True
    assert check_uniform([False, False], "anomaly_maps", "Det") is False
    with pytest.raises(DetectorError, match="Det.predict returned anomaly_maps for 1 of 3 batches"):
        check_uniform([True, False, False], "anomaly_maps", "Det")


def test_check_detector_accepts_detection_only_and_rejects_inconsistent(tmp_path) -> None:
    images, class_idx = pattern_images(2, 3)
    train = TensorTrainSet(images, class_idx, ["a", "b"], tmp_path / "ckpt")
    fitted = check_detector(DetectionOnlyMeanDetector, train, work_dir=tmp_path)
    assert fitted.predict(images[:2], class_idx[:2]).anomaly_maps is None
    with pytest.raises(DetectorError, match="anomaly_maps for a batch of 4 but None for a batch of 1"):
        check_detector(InconsistentMapsDetector, train, work_dir=tmp_path)


def test_check_detector_with_an_unscorable_class(tmp_path) -> None:
    images, class_idx = pattern_images(2, 3)
    keep = torch.tensor([0, 1, 2, 3])  # class "b" keeps one training image
    train = TensorTrainSet(images[keep], class_idx[keep], ["a", "b"], tmp_path / "ckpt")
    # the batch holds a "b" image: check_detector drops it instead of asking the detector to score it
    fitted = check_detector(PickyMeanDetector, train, images=images[keep], class_idx=class_idx[keep],
                            work_dir=tmp_path)
    assert fitted.unscorable_classes_ == {"b": "1 training image; PickyMeanDetector needs 2"}
    with pytest.raises(DetectorError, match="only classes it cannot score"):
        check_detector(PickyMeanDetector, train, images=images[3:4], class_idx=class_idx[3:4], work_dir=tmp_path)
    wrong = SimpleNamespace(unscorable_classes_={"zebra": "no reason"})
    with pytest.raises(DetectorError, match=r"Det.unscorable_classes_ names \['zebra'\]"):
        unscorable_classes(wrong, ["a", "b"], "Det")
    with pytest.raises(DetectorError, match="gives no reason"):
        unscorable_classes(SimpleNamespace(unscorable_classes_={"a": " "}), ["a", "b"], "Det")
    assert unscorable_classes(MeanDetector(MeanDetector.Config()), ["a"], "Det") == {}


# ----------------------------------------------------------------------------- evaluation


def _toy(seed: int = 0):
    """Three classes (bolt, gear: High; wood: Low), 3 normal + 3 anomalous images of 20x20 each."""
    rng = np.random.default_rng(seed)
    records = [Record(name, "test", label, "good" if label == NORMAL else "cut", f"{name}/{i}.png")
               for name in ("bolt", "gear", "wood") for i, label in enumerate([NORMAL] * 3 + [ANOMALY] * 3)]
    scores = rng.normal(size=len(records)) + np.array([r.label for r in records])
    maps = rng.random((len(records), 20, 20))
    masks = np.zeros(maps.shape, dtype=bool)
    masks[[i for i, r in enumerate(records) if r.label == ANOMALY], 5:9, 5:9] = True
    manifest = SimpleNamespace(name="toy/exp3", class_order=["bolt", "gear", "wood"], high=["bolt", "gear"],
                               low=["wood"])
    return manifest, records, scores, maps, masks


def test_evaluate_detection_only_has_null_pixel_metrics_and_no_warnings() -> None:
    manifest, records, scores, _, _ = _toy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "undefined metric" warning for a method that has no maps
        result = evaluate(manifest, records, scores, None, None)
    for name in ("bolt", "gear", "wood"):
        mine = [i for i, r in enumerate(records) if r.class_name == name]
        assert result.per_class[name]["image_auroc"] == pytest.approx(
            roc_auc(scores[mine], [records[i].label for i in mine]))
        assert all(math.isnan(result.per_class[name][key]) for key in PIXEL_KEYS)
    assert all(math.isnan(result.summary[g][key]) for g in ("all", "high", "low") for key in PIXEL_KEYS)
    assert all(result.excluded[key] == [] for key in PIXEL_KEYS)
    document = json.loads(json.dumps(result.to_json("cutpaste", "toy/exp3")))
    assert document["detection_only"] is True and document["summary"]["all"]["pixel_auroc"] is None
    lines = result.format_summary().splitlines()
    assert lines[1].split()[2:4] != ["N/A", "N/A"] and lines[1].split()[3] == "N/A"  # image AUROC, pixel AUROC
    assert lines[-1] == "N/A pixel metrics: the detector gives no anomaly maps (detection only)"
    with pytest.raises(MetricError, match="needs image scores when there are no anomaly maps"):
        evaluate(manifest, records, None, None, None)


def test_unscored_class_nulls_its_metrics_and_every_mean_that_includes_it() -> None:
    manifest, records, scores, maps, masks = _toy()
    scored = [i for i, r in enumerate(records) if r.class_name != "gear"]
    result = evaluate(manifest, [records[i] for i in scored], scores[scored], maps[scored], masks[scored],
                      unscored={"gear": "1 training image"})
    assert list(result.per_class) == ["bolt", "gear", "wood"] and result.per_class["gear"]["group"] == "high"
    assert all(math.isnan(result.per_class["gear"][key]) for key in METRIC_KEYS)
    for key in METRIC_KEYS:
        assert math.isnan(result.summary["all"][key]) and math.isnan(result.summary["high"][key])  # gear is High
        assert result.summary["low"][key] == result.per_class["wood"][key]                           # not imputed
        assert result.excluded[key] == []
    assert result.unscored == {"gear": "1 training image"}
    summary = result.format_summary()
    assert summary.splitlines()[-1] == "N/A in All, High: the detector cannot score gear (1 training image)"
    assert summary.splitlines()[1].split()[2:] == ["N/A"] * len(METRIC_KEYS)
    document = json.loads(json.dumps(result.to_json("regad", "toy/exp3")))
    assert document["unscored"] == {"gear": "1 training image"}
    assert document["per_class"]["gear"]["image_auroc"] is None and document["summary"]["high"]["image_auroc"] is None
    # a plain NaN (undefined metric) is still left out of the mean, an unscored class is not
    table = {"a": {"group": "high", **dict.fromkeys(METRIC_KEYS, 0.8)},
             "b": {"group": "high", **dict.fromkeys(METRIC_KEYS, math.nan)},
             "c": {"group": "low", **dict.fromkeys(METRIC_KEYS, 0.6)}}
    summary_values, excluded = aggregate(table)
    assert summary_values["high"]["image_auroc"] == 0.8 and excluded["image_auroc"] == ["b"]
    summary_values, excluded = aggregate(table, unscored=["b"])
    assert math.isnan(summary_values["high"]["image_auroc"]) and summary_values["low"]["image_auroc"] == 0.6
    assert excluded["image_auroc"] == []
    with pytest.raises(MetricError, match="unscored but have scored test records"):
        evaluate(manifest, records, scores, maps, masks, unscored={"gear": "x"})


# ----------------------------------------------------------------------------- runs and leaderboard


def test_detection_only_run_writes_null_pixel_metrics_and_no_overlays(tiny, tmp_path) -> None:
    run_dir, output = run_model(tiny, tmp_path / "runs", DETECTION_ONLY)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["detection_only"] is True and metrics["unscored"] == {}
    for row in [*metrics["per_class"].values(), *metrics["summary"].values()]:
        assert all(row[key] is None for key in PIXEL_KEYS) and all(row[key] is not None for key in IMAGE_KEYS)
    per_class = read_csv(run_dir / "per_class.csv")
    assert all(row[key] == "" for row in per_class for key in PIXEL_KEYS)
    assert float(per_class[0]["image_auroc"]) == metrics["per_class"]["alpha"]["image_auroc"]
    assert all(row["score"] != "" for row in read_csv(run_dir / "scores.csv"))
    assert not list((run_dir / "maps").rglob("*.png")) if (run_dir / "maps").exists() else True
    assert "No overlays: tests.mean_detector:DetectionOnlyMeanDetector is detection-only" in output
    assert summary_row(output, "All")[1] == "N/A" and summary_row(output, "All")[0] != "N/A"
    assert "N/A pixel metrics: the detector gives no anomaly maps (detection only)" in output

    board = invoke("leaderboard", tmp_path / "runs", "--per-class")
    assert board.exit_code == 0, board.output
    (seg,) = [line for line in board.output.splitlines() if line.startswith("| tests.mean_detector:Detection")
              and "| N/A" in line]
    assert seg.count("N/A") == 5  # All, High, Low, alpha, beta of the pixel AUROC table
    assert "Seg. (pixel AUROC) is N/A: the detector gives no anomaly maps (detection only)" in board.output

    predictions = invoke("predict", run_dir, tiny[0] / "alpha" / "test" / "good" / "000.png", "--class", "alpha",
                         "--out", tmp_path / "pred")
    assert predictions.exit_code == 0, predictions.output
    assert "0 overlays" in predictions.output and "detection-only" in predictions.output
    assert read_csv(tmp_path / "pred" / "scores.csv")[0]["overlay"] == ""


def test_maps_for_some_batches_only_is_an_error_naming_the_detector(tiny, tmp_path) -> None:
    root, manifest = tiny
    result = invoke("run", "--model", INCONSISTENT, "--split", manifest, "--root", root, "--out", tmp_path,
                    "--device", "cpu", "--batch-size", "3")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "tests.mean_detector:InconsistentMapsDetector.predict returned anomaly_maps for 2 of 3 batches" in line


def test_unscorable_class_run_is_null_named_and_never_predicted(tiny, tmp_path) -> None:
    # PickyMeanDetector raises if asked to score beta: the run finishing shows the runner never asked
    run_dir, output = run_model(tiny, tmp_path / "runs", PICKY)
    reason = "1 training image; PickyMeanDetector needs 2"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["unscored"] == {"beta": reason}
    assert all(metrics["per_class"]["beta"][key] is None for key in METRIC_KEYS)
    assert all(metrics["per_class"]["alpha"][key] is not None for key in METRIC_KEYS)
    for key in METRIC_KEYS:
        assert metrics["summary"]["all"][key] is None and metrics["summary"]["low"][key] is None
        assert metrics["summary"]["high"][key] == metrics["per_class"]["alpha"][key]
    rows = read_csv(run_dir / "scores.csv")
    assert len(rows) == 2 * N_TEST
    assert [r["score"] == "" for r in rows] == [r["class_name"] == "beta" for r in rows]
    alpha = [r for r in rows if r["class_name"] == "alpha"]
    assert metrics["per_class"]["alpha"]["image_auroc"] == pytest.approx(
        roc_auc([float(r["score"]) for r in alpha], [int(r["label"]) for r in alpha]))
    beta_row = next(r for r in read_csv(run_dir / "per_class.csv") if r["class_name"] == "beta")
    assert all(beta_row[key] == "" for key in METRIC_KEYS)
    assert summary_row(output, "All") == ["N/A"] * len(METRIC_KEYS)
    assert summary_row(output, "Low") == ["N/A"] * len(METRIC_KEYS)
    assert "N/A" not in summary_row(output, "High")
    assert f"N/A in All, Low: the detector cannot score beta ({reason})" in output
    log = (run_dir / "log.txt").read_text()
    assert f"Not scoring {N_TEST} test images of 1 classes that {PICKY} cannot score" in log and reason in log
    assert {p.parent.name for p in (run_dir / "maps").rglob("*.png")} == {"alpha"}

    board = invoke("leaderboard", tmp_path / "runs", "--per-class")
    assert board.exit_code == 0, board.output
    det = next(line for line in board.output.splitlines() if line.startswith("| tests.mean_detector:Picky"))
    cells = [cell.strip() for cell in det.strip("|").split("|")]
    assert cells[1] == "N/A" and cells[2] != "N/A" and cells[3] == "N/A" and cells[5] == "N/A"  # All, High, Low, β
    assert f"N/A in All, Low and the class columns of the classes it cannot score: beta ({reason})" in board.output

    refused = invoke("predict", run_dir, tiny[0] / "beta" / "test" / "good" / "000.png", "--class", "beta",
                     "--out", tmp_path / "pred")
    assert refused.exit_code == 1 and f"cannot score class 'beta': {reason}" in refused.output


def test_a_cut_and_paste_run_writes_null_pixel_metrics_and_the_leaderboard_prints_na(tiny, tmp_path) -> None:
    # the real detection-only baseline through the CLI (a tiny ResNet-18 from scratch, as tests/test_cutpaste.py)
    tiny_settings = ["network=resnet18", "pretrained=false", "width=8", "image_size=64", "steps=2", "batch_size=4"]
    run_dir, output = run_model(tiny, tmp_path / "runs", "cutpaste", *[a for s in tiny_settings for a in ("--set", s)])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["detection_only"] is True
    for row in [*metrics["per_class"].values(), *metrics["summary"].values()]:
        assert all(row[key] is None for key in PIXEL_KEYS) and all(row[key] is not None for key in IMAGE_KEYS)
    assert summary_row(output, "All")[1] == "N/A" and summary_row(output, "All")[0] != "N/A"
    board = invoke("leaderboard", tmp_path / "runs", "--per-class")
    assert board.exit_code == 0, board.output
    (seg,) = [line for line in board.output.splitlines() if line.startswith("| Cut & Paste") and "| N/A" in line]
    assert seg.count("N/A") == 5  # All, High, Low, alpha, beta of the pixel AUROC table
    assert "cutpaste on folder/exp6: Seg. (pixel AUROC) is N/A: the detector gives no anomaly maps" in board.output
