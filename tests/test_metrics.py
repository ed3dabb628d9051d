"""Metric functions against scikit-learn, a brute-force AUPRO sweep, and hand-derived answers."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ltbench.errors import MetricError
from ltbench.metrics import aupro, average_precision, f1_max, image_score_from_map, roc_auc


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over sklearn's precision-recall curve (an independent reference)."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1.max())


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """F1 of predicting anomaly where score >= threshold, counted directly."""
    predicted = scores >= threshold
    tp = np.count_nonzero(predicted & labels)
    fp = np.count_nonzero(predicted & ~labels)
    fn = np.count_nonzero(~predicted & labels)
    return 2 * tp / (2 * tp + fp + fn)


def assert_matches_sklearn(scores: np.ndarray, labels: np.ndarray) -> None:
    """AUROC, AP and F1-max equal sklearn's to 1e-9; the returned threshold achieves the F1."""
    labels = labels.astype(bool)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    best, threshold = f1_max(scores, labels)
    assert best == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-9)
    assert f1_at(scores, labels, threshold) == pytest.approx(best, abs=1e-12)


def random_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random labels with both classes present."""
    labels = rng.random(n) < rng.uniform(0.05, 0.95)
    labels[0], labels[1] = True, False
    return labels


# ------------------------------------------------------------------------- AUROC / AP / F1-max

@pytest.mark.parametrize("seed", range(40))
def test_heavy_ties_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    levels = int(rng.integers(1, 12))                        # few distinct values: most scores tie
    scores = (rng.integers(0, levels, n) / 7.0).astype(np.float32)
    assert_matches_sklearn(scores, random_labels(rng, n))


@pytest.mark.parametrize("seed", range(10))
def test_continuous_scores_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(50, 3000))
    labels = random_labels(rng, n)
    scores = rng.normal(size=n) + labels * rng.uniform(-1, 2)   # includes AUROC < 0.5
    assert_matches_sklearn(scores, labels)


def test_auroc_below_half_is_not_flipped() -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.2])
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(scores, labels) == 0.0


def test_constant_scores() -> None:
    labels = np.array([1, 0, 0, 1, 0])
    scores = np.full(5, 3.25, dtype=np.float32)
    assert roc_auc(scores, labels) == 0.5
    assert average_precision(scores, labels) == pytest.approx(2 / 5)    # one threshold: precision 2/5
    assert f1_max(scores, labels) == (pytest.approx(2 * 2 / (2 * 2 + 3)), 3.25)
    assert_matches_sklearn(scores, labels)


def test_single_positive() -> None:
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, 200).astype(np.float64)
    labels = np.zeros(200, dtype=bool)
    labels[17] = True
    assert_matches_sklearn(scores, labels)
    # hand-derived: the positive beats every negative below it and ties count half
    below = np.count_nonzero(scores[~labels] < scores[17])
    tied = np.count_nonzero(scores[~labels] == scores[17])
    assert roc_auc(scores, labels) == pytest.approx((below + 0.5 * tied) / 199, abs=1e-15)


def test_extreme_magnitudes() -> None:
    rng = np.random.default_rng(3)
    scores = 10.0 ** rng.uniform(-12, 12, 2000)
    scores[::7] = 1e-12                                        # ties at both extremes
    scores[::11] = 1e12
    labels = random_labels(rng, 2000) | (scores > 1e6)
    assert_matches_sklearn(scores, labels)


def test_integer_scores_and_labels() -> None:
    rng = np.random.default_rng(4)
    scores = rng.integers(-3, 4, 500)                          # int64 scores
    labels = random_labels(rng, 500).astype(np.int32)
    assert_matches_sklearn(scores, labels)
    assert isinstance(roc_auc(scores, labels), float)
    assert isinstance(f1_max(scores, labels)[1], float)


def test_hand_computed_values() -> None:
    # scores 4 3 2 1 (descending), labels 1 0 1 0
    scores, labels = np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0])
    assert roc_auc(scores, labels) == pytest.approx(3 / 4)      # 3 of 4 (pos, neg) pairs ordered
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # F1 at t=4: 2/(2+0+1)=2/3; at t=2: 4/(4+1+0)=4/5
    assert f1_max(scores, labels) == (pytest.approx(4 / 5), 2.0)


def test_torch_and_multidimensional_inputs() -> None:
    rng = np.random.default_rng(5)
    maps = rng.random((3, 8, 8)).astype(np.float32).round(1)
    masks = rng.random((3, 8, 8)) < 0.2
    expected = roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    assert roc_auc(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(maps.transpose(0, 2, 1), masks.transpose(0, 2, 1)) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(torch.from_numpy(maps).to(torch.bfloat16), masks) == pytest.approx(
        roc_auc_score(masks.reshape(-1), torch.from_numpy(maps).to(torch.bfloat16).float().numpy().reshape(-1)))


def test_memory_is_one_copy_of_the_input() -> None:
    rng = np.random.default_rng(6)
    scores = (rng.random(2_000_000, dtype=np.float32) * 256).round()
    labels = rng.random(2_000_000) < 0.03
    input_bytes = scores.nbytes + labels.nbytes
    tracemalloc.start()
    try:
        roc_auc(scores, labels)
        average_precision(scores, labels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 1.25 * input_bytes, f"peak extra memory {peak} bytes for an input of {input_bytes}"


@pytest.mark.parametrize("function", [roc_auc, average_precision, f1_max])
def test_ranking_errors(function) -> None:
    with pytest.raises(MetricError, match="empty"):
        function(np.array([]), np.array([], dtype=bool))
    with pytest.raises(MetricError, match="NaN or infinite"):
        function(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(MetricError, match="NaN or infinite"):
        function(np.array([0.1, np.inf, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(MetricError, match="shape"):
        function(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(MetricError, match="only one class"):
        function(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(MetricError, match="only one class"):
        function(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(MetricError, match="only 0"):
        function(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(MetricError, match="bool or integer"):
        function(np.array([0.1, 0.2]), np.array([0.0, 1.0]))


# ------------------------------------------------------------------------------------------ AUPRO

def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """The definition, evaluated threshold by threshold (slow): an independent reference."""
    regions = []
    for image_map, mask in zip(maps, masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [image_map[labelled == k] for k in range(1, count + 1)]
    normal = maps[~masks]
    curve = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        curve.append((float(np.mean(normal >= threshold)),
                      float(np.mean([np.mean(region >= threshold) for region in regions]))))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:                       # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def test_aupro_two_regions_hand_derived() -> None:
    # one image; region A = two pixels (0.9, 0.5), region B = one pixel (0.7); normals 0.8, 0.6, 0.1 x5
    maps = np.array([[[0.9, 0.5, 0.8, 0.6, 0.1],
                      [0.1, 0.1, 0.1, 0.1, 0.7]]], dtype=np.float32)
    masks = np.array([[[1, 1, 0, 0, 0],
                       [0, 0, 0, 0, 1]]], dtype=bool)
    # curve (FPR, PRO): (0, .25) -> (1/7, .25) -> (1/7, .75) -> (2/7, .75) -> (2/7, 1) -> (1, 1)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx((0.25 + 0.75 + 5) / 7, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx((0.25 + 0.75 + 1.5) / 7 / 0.5, abs=1e-12)
    assert aupro(maps, masks) == pytest.approx((0.25 + 0.75 + 0.1) / 7 / 0.3, abs=1e-12)   # = 11/21


def test_aupro_tie_between_normal_and_anomalous_is_a_straight_segment() -> None:
    # one region of two pixels (0.9, 0.5); four normal pixels at 0.5: from (0, .5) straight to (1, 1)
    maps = np.array([[0.5, 0.9, 0.5, 0.5, 0.5, 0.5]])
    masks = np.array([[1, 1, 0, 0, 0, 0]])
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)
    # at FPR 0.5 the segment is at PRO 0.75: area 0.5 * (0.5 + 0.75) / 2, over 0.5
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx(0.625, abs=1e-12)


def test_aupro_regions_are_eight_connected() -> None:
    # (0,0) touches (1,1) diagonally: one region of three pixels, not {1 pixel} + {2 pixels}
    maps = np.full((3, 3), 0.5)
    maps[0, 0] = 0.9
    maps[1, 1] = maps[1, 2] = 0.1
    masks = np.zeros((3, 3), dtype=bool)
    masks[0, 0] = masks[1, 1] = masks[1, 2] = True
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(1 / 3, abs=1e-12)   # 4-connected: 1/2


def test_aupro_averages_regions_across_images() -> None:
    # image 0: a 4-pixel region at 0.9, normals 0.3 x2; image 1: a 1-pixel region at 0.2, normals 0.1 x5
    maps = np.array([[[0.9, 0.9, 0.3], [0.9, 0.9, 0.3]],
                     [[0.1, 0.1, 0.1], [0.1, 0.1, 0.2]]])
    masks = np.array([[[1, 1, 0], [1, 1, 0]],
                      [[0, 0, 0], [0, 0, 1]]])
    # curve: (0, .5) -> (2/7, .5) -> (2/7, 1) -> (1, 1); pixel-weighted TPR would give .8, not .5
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(6 / 7, abs=1e-12)
    assert aupro(maps, masks) == pytest.approx(11 / 21, abs=1e-12)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks).bool()) == pytest.approx(11 / 21, abs=1e-12)


def test_aupro_perfect_and_inverted_maps() -> None:
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 4:, 4:] = True
    assert aupro(masks.astype(np.float32), masks) == 1.0
    assert aupro(-masks.astype(np.float32), masks) == 0.0


@pytest.mark.parametrize("seed", range(12))
def test_aupro_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 4)), int(rng.integers(4, 12)), int(rng.integers(4, 12)))
    masks = ndimage.binary_dilation(rng.random(shape) < 0.04, structure=np.ones((1, 2, 2)))
    masks.reshape(-1)[0], masks.reshape(-1)[-1] = True, False
    levels = int(rng.integers(2, 30))
    maps = (rng.integers(0, levels, shape) + 3 * masks * rng.random(shape)).round(1).astype(np.float32)
    for fpr_limit in (0.3, 0.05, float(rng.uniform(0.01, 1.0)), 1.0):
        assert aupro(maps, masks, fpr_limit) == pytest.approx(brute_force_aupro(maps, masks, fpr_limit),
                                                              abs=1e-9)


def test_aupro_errors() -> None:
    maps = np.random.default_rng(0).random((2, 5, 5))
    masks = np.zeros((2, 5, 5), dtype=bool)
    with pytest.raises(MetricError, match="no anomalous pixel"):
        aupro(maps, masks)
    with pytest.raises(MetricError, match="only one class"):
        aupro(maps, np.ones((2, 5, 5), dtype=bool))
    masks[0, 2, 2] = True
    with pytest.raises(MetricError, match="shape"):
        aupro(maps, masks[:, :4])
    with pytest.raises(MetricError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(MetricError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=1.5)
    with pytest.raises(MetricError, match="empty"):
        aupro(np.zeros((0, 5, 5)), np.zeros((0, 5, 5), dtype=bool))
    bad = maps.copy()
    bad[1, 3, 3] = np.nan
    with pytest.raises(MetricError, match="NaN or infinite"):
        aupro(bad, masks)
    with pytest.raises(MetricError, match=r"\(N, H, W\)"):
        aupro(maps[None], masks[None])


# ------------------------------------------------------------------------------------ image score

def test_image_score_from_map_matches_average_pooling() -> None:
    rng = np.random.default_rng(8)
    maps = rng.random((5, 40, 33)).astype(np.float32)
    maps[2, 10:26, 5:21] += 4.0                                # one 16x16 hot block
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(maps).double()[:, None], 16, stride=1)
    expected = pooled.amax(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(image_score_from_map(maps), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(image_score_from_map(torch.from_numpy(maps)), expected, rtol=0, atol=1e-12)
    constant = np.full((1, 16, 16), 0.25)
    assert image_score_from_map(constant)[0] == pytest.approx(0.25, abs=1e-15)


def test_image_score_from_map_errors() -> None:
    with pytest.raises(MetricError, match="H, W >= 16"):
        image_score_from_map(np.zeros((2, 15, 40)))
    with pytest.raises(MetricError, match="NaN or infinite"):
        image_score_from_map(np.full((1, 16, 16), np.inf))
    with pytest.raises(MetricError, match="empty"):
        image_score_from_map(np.zeros((0, 16, 16)))


# ------------------------------------------------------------------------------ block boundaries

@pytest.mark.parametrize("seed", range(8))
def test_small_blocks_give_the_same_values(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Sweeps run block by block: runs of tied scores that cross a block boundary must not matter."""
    import ltbench.metrics

    monkeypatch.setattr(ltbench.metrics, "_BLOCK", 5)
    rng = np.random.default_rng(200 + seed)
    shape = (2, 9, 9)
    masks = ndimage.binary_dilation(rng.random(shape) < 0.05, structure=np.ones((1, 3, 3)))
    masks.reshape(-1)[0], masks.reshape(-1)[-1] = True, False
    maps = (rng.integers(0, 6, shape) + 2 * masks * rng.integers(0, 3, shape)).astype(np.float32)
    assert_matches_sklearn(maps.reshape(-1), masks.reshape(-1))
    for fpr_limit in (0.3, 1.0):
        assert aupro(maps, masks, fpr_limit) == pytest.approx(brute_force_aupro(maps, masks, fpr_limit), abs=1e-9)
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(maps).double()[:, None], 4, stride=1)
    np.testing.assert_allclose(image_score_from_map(maps, pool=4), pooled.amax(dim=(1, 2, 3)).numpy(), atol=1e-12)
