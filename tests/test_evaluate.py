"""evaluate(): per-class tables, High / Low / All means, exclusions, JSON and the printed summary."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ltbench.datasets.base import ANOMALY, NORMAL, Record
from ltbench.errors import MetricError
from ltbench.evaluation import Evaluation, MetricWarning, aggregate, evaluate
from ltbench.metrics import METRIC_KEYS, aupro, f1_max, image_score_from_map

SIZE = 20   # maps are SIZE x SIZE here (224 x 224 in the protocol); >= 16 for the pooled image score


def toy_manifest() -> SimpleNamespace:
    """What evaluate reads of a split manifest: name, class order, High and Low lists."""
    return SimpleNamespace(name="toy/exp10", class_order=["bolt", "cable", "gear", "wood"],
                           high=["bolt", "cable"], low=["gear", "wood"])


def make_test_set(seed: int, classes: list[tuple[str, int, int]]):
    """Records, image scores, maps and masks for (class, n_normal, n_anomalous), classes interleaved.

    Anomalous images get a square defect in the mask, and a noisy hot spot in the map.
    """
    rng = np.random.default_rng(seed)
    records, masks = [], []
    for name, n_normal, n_anomalous in classes:
        for k in range(n_normal + n_anomalous):
            label = ANOMALY if k >= n_normal else NORMAL
            mask = np.zeros((SIZE, SIZE), dtype=bool)
            if label == ANOMALY:
                top, left = rng.integers(0, SIZE - 5, 2)
                mask[top:top + int(rng.integers(2, 5)), left:left + int(rng.integers(2, 5))] = True
            records.append(Record(name, "test", label, "good" if label == NORMAL else "scratch",
                                  f"{name}/test/{k:03d}.png", None if label == NORMAL else f"{name}/gt/{k:03d}.png"))
            masks.append(mask)
    order = rng.permutation(len(records))                   # arrays need not be grouped by class
    records = [records[i] for i in order]
    masks = np.stack(masks)[order]
    maps = (rng.random(masks.shape) + masks * rng.random(masks.shape) * 1.5).round(2).astype(np.float32)
    image_scores = np.array([r.label for r in records]) * 0.4 + rng.random(len(records))
    return records, image_scores, maps, masks


def class_arrays(records, image_scores, maps, masks, name):
    """The selected class's image labels, image scores, maps and masks."""
    members = [i for i, r in enumerate(records) if r.class_name == name]
    labels = np.array([records[i].label for i in members])
    return labels, image_scores[members], maps[members], masks[members]


def test_per_class_values_match_references() -> None:
    data = make_test_set(0, [("wood", 6, 5), ("bolt", 4, 7), ("cable", 5, 5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # every class is well defined: no warning
        result = evaluate(toy_manifest(), *data)
    assert list(result.per_class) == ["bolt", "cable", "wood"]         # manifest order; gear has no test
    for name in result.per_class:
        labels, scores, maps, masks = class_arrays(*data, name)
        row = result.per_class[name]
        assert row["group"] == ("high" if name in ("bolt", "cable") else "low")
        assert row["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert row["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert row["image_f1_max"] == f1_max(scores, labels)[0]
        assert row["pixel_auroc"] == pytest.approx(roc_auc_score(masks.reshape(-1), maps.reshape(-1)), abs=1e-12)
        assert row["pixel_ap"] == pytest.approx(average_precision_score(masks.reshape(-1), maps.reshape(-1)),
                                                abs=1e-12)
        assert row["pixel_f1_max"] == f1_max(maps, masks)[0]
        assert row["pixel_aupro"] == pytest.approx(aupro(maps, masks, 0.3), abs=1e-12)
    for key in METRIC_KEYS:
        rows = result.per_class
        assert result.summary["high"][key] == pytest.approx((rows["bolt"][key] + rows["cable"][key]) / 2)
        assert result.summary["low"][key] == rows["wood"][key]
        assert result.summary["all"][key] == pytest.approx(sum(rows[c][key] for c in rows) / 3)
    assert result.excluded == {key: [] for key in METRIC_KEYS}
    assert result.warnings == []


def test_torch_inputs_and_contiguous_class_blocks() -> None:
    records, image_scores, maps, masks = make_test_set(1, [("bolt", 3, 3), ("gear", 3, 4)])
    order = np.argsort([r.class_name for r in records], kind="stable")   # grouped by class: views, no copies
    records = [records[i] for i in order]
    numpy_result = evaluate(toy_manifest(), records, image_scores[order], maps[order], masks[order])
    torch_result = evaluate(toy_manifest(), records, torch.from_numpy(image_scores[order]),
                            torch.from_numpy(maps[order]), torch.from_numpy(masks[order]))
    assert torch_result.per_class == numpy_result.per_class
    _, _, class_maps, class_masks = class_arrays(records, image_scores[order], maps[order], masks[order], "gear")
    assert numpy_result.per_class["gear"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(class_masks.reshape(-1), class_maps.reshape(-1)), abs=1e-12)


def test_image_scores_default_to_the_pooled_map_maximum() -> None:
    records, _, maps, masks = make_test_set(2, [("cable", 4, 4), ("wood", 5, 3)])
    result = evaluate(toy_manifest(), records, None, maps, masks)
    pooled = image_score_from_map(maps)
    for name in ("cable", "wood"):
        labels, scores, _, _ = class_arrays(records, pooled, maps, masks, name)
        assert result.per_class[name]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_below_half_is_reported_as_is() -> None:
    records, image_scores, maps, masks = make_test_set(3, [("bolt", 4, 4), ("gear", 4, 4)])
    labels = np.array([r.label for r in records])
    inverted = -image_scores - labels                          # every anomaly scores below every normal
    result = evaluate(toy_manifest(), records, inverted, maps, masks)
    assert result.per_class["bolt"]["image_auroc"] == 0.0
    assert result.summary["all"]["image_auroc"] == 0.0


def test_single_label_class_is_nan_warned_and_left_out() -> None:
    data = make_test_set(4, [("bolt", 4, 4), ("cable", 5, 0), ("gear", 3, 3)])
    with pytest.warns(MetricWarning, match="'cable'") as caught:
        result = evaluate(toy_manifest(), *data)
    cable = result.per_class["cable"]
    for key in METRIC_KEYS:                                   # no anomalous image and no anomalous pixel
        assert math.isnan(cable[key])
        assert result.excluded[key] == ["cable"]
        assert result.summary["high"][key] == result.per_class["bolt"][key]
        assert result.summary["all"][key] == pytest.approx(
            (result.per_class["bolt"][key] + result.per_class["gear"][key]) / 2)
    assert len(result.warnings) == 2 and all("'cable'" in note for note in result.warnings)
    assert len(caught) == 2
    summary = result.format_summary()
    assert "cable" in summary.splitlines()[-1] and "left out of the means" in summary
    document = result.to_json("ltad", "toy/exp10")
    assert document["per_class"]["cable"]["image_auroc"] is None
    json.dumps(document, allow_nan=False)                     # strict JSON: NaN became null


def test_all_anomalous_class_and_empty_masks() -> None:
    records, image_scores, maps, masks = make_test_set(5, [("bolt", 0, 4), ("wood", 4, 4)])
    masks[[i for i, r in enumerate(records) if r.class_name == "wood"]] = False   # masks lost in resizing
    with pytest.warns(MetricWarning) as caught:
        result = evaluate(toy_manifest(), records, image_scores, maps, masks)
    messages = [str(w.message) for w in caught]
    assert any("'bolt'" in m and "all anomalous" in m for m in messages)
    assert any("'wood'" in m and "no anomalous pixel" in m for m in messages)
    assert math.isnan(result.per_class["bolt"]["image_auroc"]) and not math.isnan(result.per_class["bolt"]["pixel_auroc"])
    assert math.isnan(result.per_class["wood"]["pixel_aupro"]) and not math.isnan(result.per_class["wood"]["image_ap"])
    assert math.isnan(result.summary["low"]["pixel_auroc"])   # wood is Low's only class
    assert result.summary["all"]["pixel_auroc"] == result.per_class["bolt"]["pixel_auroc"]


# ---------------------------------------------------------------------------------- aggregation

def hand_table() -> dict[str, dict[str, float | str]]:
    """Four classes, two per group; metric values chosen so the means are easy to check by hand."""
    values = {"bolt": 0.9, "cable": 0.7, "gear": 0.5, "wood": math.nan}
    return {name: {"group": "high" if name in ("bolt", "cable") else "low",
                   **{key: value if key != "pixel_aupro" else 0.25 for key in METRIC_KEYS}}
            for name, value in values.items()}


def test_aggregate_hand_table() -> None:
    summary, excluded = aggregate(hand_table())
    assert summary["high"]["image_auroc"] == pytest.approx(0.8)             # (0.9 + 0.7) / 2
    assert summary["low"]["image_auroc"] == pytest.approx(0.5)              # wood left out
    assert summary["all"]["pixel_ap"] == pytest.approx(0.7)                 # (0.9 + 0.7 + 0.5) / 3
    assert summary["all"]["pixel_aupro"] == pytest.approx(0.25)
    assert excluded["image_auroc"] == ["wood"] and excluded["pixel_aupro"] == []


def test_format_summary_and_json_of_hand_table() -> None:
    summary, excluded = aggregate(hand_table())
    result = Evaluation(per_class=hand_table(), summary=summary, excluded=excluded)
    lines = result.format_summary().splitlines()
    assert lines[0].split()[:5] == ["group", "image", "AUROC*", "pixel", "AUROC*"]
    assert lines[1].split()[:4] == ["All", "(4)", "70.00", "70.00"]
    assert lines[2].split()[:4] == ["High", "(2)", "80.00", "80.00"]
    assert lines[3].split()[:4] == ["Low", "(2)", "50.00", "50.00"]
    assert lines[1].split()[-1] == "25.00"                              # pixel AUPRO, nothing excluded
    assert lines[4].startswith("* image AUROC, pixel AUROC") and lines[4].endswith("wood")
    assert "pixel AUPRO" not in lines[4]
    document = result.to_json("uniad", "toy/exp10")
    read_back = json.loads(json.dumps(document))                           # NaN is null there
    reprinted = Evaluation(per_class=read_back["per_class"], summary=read_back["summary"]).format_summary()
    assert [line.split() for line in reprinted.splitlines()[1:4]] == [line.split() for line in lines[1:4]]
    read_back["summary"]["low"]["image_ap"] = None                          # no Low class defined it
    reprinted = Evaluation(per_class=read_back["per_class"], summary=read_back["summary"]).format_summary()
    assert reprinted.splitlines()[3].split()[4] == "N/A"
    assert set(document) == {"model", "split", "per_class", "summary", "unscored", "detection_only"}
    assert document["unscored"] == {} and document["detection_only"] is False
    assert document["model"] == "uniad" and document["split"] == "toy/exp10"
    assert set(document["summary"]) == {"all", "high", "low"}
    assert all(set(row) == set(METRIC_KEYS) for row in document["summary"].values())
    assert all(set(row) == {"group", *METRIC_KEYS} for row in document["per_class"].values())
    assert document["per_class"]["wood"]["image_auroc"] is None
    assert document["summary"]["high"]["image_auroc"] == pytest.approx(0.8)


# --------------------------------------------------------------------------------------- errors

def test_errors() -> None:
    records, image_scores, maps, masks = make_test_set(6, [("bolt", 3, 3), ("gear", 3, 3)])
    manifest = toy_manifest()
    bad_maps = maps.copy()
    bad_maps[2, 5, 5] = np.nan
    with pytest.raises(MetricError, match="anomaly maps holds 1 NaN"):
        evaluate(manifest, records, image_scores, bad_maps, masks)
    bad_scores = image_scores.copy()
    bad_scores[0] = -np.inf
    with pytest.raises(MetricError, match="image scores holds 1 NaN or infinite"):
        evaluate(manifest, records, bad_scores, maps, masks)
    with pytest.raises(MetricError, match="shape"):
        evaluate(manifest, records, image_scores, maps, masks[:, :, :-1])
    with pytest.raises(MetricError, match="12 test records but 11 anomaly maps"):
        evaluate(manifest, records, image_scores[:-1], maps[:-1], masks[:-1])
    with pytest.raises(MetricError, match=r"image scores must have shape \(12,\)"):
        evaluate(manifest, records, image_scores[:-1], maps, masks)
    with pytest.raises(MetricError, match="at least one test record"):
        evaluate(manifest, [], None, maps[:0], masks[:0])
    stranger = [Record("hazelnut", "test", NORMAL, "good", "x.png")] + records[1:]
    with pytest.raises(MetricError, match="hazelnut"):
        evaluate(manifest, stranger, image_scores, maps, masks)
    with pytest.raises(MetricError, match="neither the High nor the Low"):
        evaluate(SimpleNamespace(**{**vars(manifest), "low": ["wood"]}), records, image_scores, maps, masks)
