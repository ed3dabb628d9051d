"""Exact ranking metrics (AUROC, AP, F1-max, AUPRO) and the protocol's image score from a map.

Every metric is exact over all distinct score values, with ties handled as scikit-learn does,
yet cheap enough for hundreds of millions of pixels. The trick is to split the scores by label
and sort each side once (numpy's in-place SIMD sort of the score dtype, no argsort of the whole
array): every quantity a threshold sweep needs is then a count of scores above, at or below a
value, which `np.searchsorted` reads off the other sorted side. Sums over thresholds run in
blocks of `_BLOCK` elements, so float64 / int64 temporaries stay a few MiB whatever the input
size. Peak extra memory is one copy of the scores plus a boolean mask, see `bench/metrics.py`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from ltbench.errors import MetricError

METRIC_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
)
IMAGE_KEYS = METRIC_KEYS[:3]
PIXEL_KEYS = METRIC_KEYS[3:]

POOL_SIZE = 16                    # image score = max of the 16x16 average-pooled map (DESIGN.md, protocol)
AUPRO_FPR_LIMIT = 0.3             # integrate PRO up to FPR 0.3, as MVTec AD (Bergmann et al., IJCV 2021)
_BLOCK = 1 << 18                  # elements per block of a sweep: keeps its temporaries to a few MiB
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # regions touch diagonally too, as in MVTec AD's code

# ----------------------------------------------------------------------------------------- inputs

def _to_numpy(values: Any) -> np.ndarray:
    """A numpy view of a torch tensor (no copy on CPU) or of anything `np.asarray` accepts."""
    if hasattr(values, "detach") and hasattr(values, "numpy"):  # a torch.Tensor, without importing torch
        values = values.detach()
        if values.device.type != "cpu":
            values = values.cpu()
        if str(values.dtype) == "torch.bfloat16":   # numpy has no bfloat16
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def _first_non_finite(values: np.ndarray) -> int:
    """Flat index of the first NaN or infinite value, or -1 when there is none (block by block)."""
    flat = values.reshape(-1)
    for start in range(0, flat.size, _BLOCK):
        bad = np.flatnonzero(~np.isfinite(flat[start:start + _BLOCK]))
        if bad.size:
            return start + int(bad[0])
    return -1


def _check_scores(values: Any, what: str) -> np.ndarray:
    """Scores as a numpy array of real numbers, all finite; raises MetricError otherwise."""
    scores = np.atleast_1d(_to_numpy(values))
    if scores.size == 0:
        raise MetricError(f"{what} is empty: a metric needs at least one score")
    if scores.dtype.kind == "b":
        return scores.view(np.uint8)
    if scores.dtype.kind not in "iuf":
        raise MetricError(f"{what} must hold real numbers, got dtype {scores.dtype}")
    # min and max propagate NaN and show infinities without allocating a mask of the whole array
    if scores.dtype.kind == "f" and not (np.isfinite(scores.min()) and np.isfinite(scores.max())):
        first = _first_non_finite(scores)
        count = int(scores.size - np.count_nonzero(np.isfinite(scores)))
        raise MetricError(
            f"{what} holds {count} NaN or infinite value(s) (the first at flat index {first}, "
            f"value {scores.reshape(-1)[first]}); scores must be finite: check the detector's output"
        )
    return scores


def _check_labels(values: Any, what: str) -> np.ndarray:
    """Labels as a boolean array (True = anomaly); accepts bool or integer 0/1 arrays."""
    labels = np.atleast_1d(_to_numpy(values))
    if labels.dtype.kind == "b":
        return labels
    if labels.dtype.kind not in "iu":
        raise MetricError(f"{what} must be a bool or integer 0/1 array, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 1):
        raise MetricError(
            f"{what} must hold only 0 (normal) and 1 (anomaly), got values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    return labels.astype(bool)


def _check_pair(scores: Any, labels: Any, score_name: str = "scores",
                label_name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Validated scores and boolean labels of the same shape."""
    scores = _check_scores(scores, score_name)
    labels = _check_labels(labels, label_name)
    if scores.shape != labels.shape:
        raise MetricError(
            f"{score_name} has shape {scores.shape} but {label_name} has shape {labels.shape}; "
            "they must match element for element"
        )
    return scores, labels


def _require_both_labels(n_positive: int, n_negative: int, what: str) -> None:
    """Raise MetricError when one label is missing: the metric is undefined then."""
    if n_positive == 0 or n_negative == 0:
        missing = "anomalous (1)" if n_positive == 0 else "normal (0)"
        raise MetricError(f"{what} is undefined: the labels hold no {missing} sample, only one class")


# ------------------------------------------------------------------------------- ranking metrics

class _Ranking(NamedTuple):
    """The threshold-sweep metrics of one set of scores, from one sort."""

    auroc: float
    average_precision: float
    f1_max: float
    f1_threshold: float


def _runs(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a sorted block and how often each occurs.

    Parameters
    ----------
    block: (B,) ascending, B >= 1.

    Returns
    -------
    (D,) distinct values ascending, (D,) int64 run lengths summing to B.
    """
    new_value = np.empty(block.size, dtype=bool)
    new_value[0] = True
    np.not_equal(block[1:], block[:-1], out=new_value[1:])
    starts = np.flatnonzero(new_value)
    return block[starts], np.diff(starts, append=block.size)


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the positives and of the negatives, each sorted ascending.

    Parameters
    ----------
    scores: (...) real array, finite.
    labels: (...) bool array of the same shape, True = positive.

    Returns
    -------
    (P,) and (M,) arrays of the scores' dtype: together one copy of `scores`.
    """
    positives = scores[labels]
    positives.sort()
    negatives = scores[~labels]
    negatives.sort()
    return positives, negatives


def _ranking(positives: np.ndarray, negatives: np.ndarray) -> _Ranking:
    """AUROC, AP and F1-max of sorted positive and negative scores, exact over all thresholds.

    Parameters
    ----------
    positives: (P,) ascending scores of the positives, P >= 1.
    negatives: (M,) ascending scores of the negatives, M >= 1, same dtype.

    Returns
    -------
    _Ranking with the three metrics and the threshold of the best F1 (predict positive where
    score >= threshold; the highest such threshold when several give the best F1).
    """
    n_pos, n_neg = positives.size, negatives.size
    # AUROC is the Mann-Whitney statistic: the trapezoidal ROC area with ties counting one half.
    # Summed here as twice U in exact integers: each positive adds 2*#(neg below) + #(neg tied).
    twice_u = 0
    precision_sum = 0.0
    best_f1, best_threshold = -1.0, math.nan
    for start in range(0, n_pos, _BLOCK):
        values, counts = _runs(positives[start:start + _BLOCK])         # (D,) ascending, (D,) int64
        neg_below = np.searchsorted(negatives, values, "left")          # (D,) int64
        neg_at_or_below = np.searchsorted(negatives, values, "right")
        twice_u += int(np.dot(counts, neg_below + neg_at_or_below))
        # At threshold t = a positive's own score: tp = #pos >= t, fp = #neg >= t. Only these
        # thresholds raise recall, so AP = sum over positives of precision(t) / P, which is
        # sklearn's sum over thresholds of (R_n - R_{n-1}) P_n; and F1 peaks at one of them,
        # since lowering t between two positive scores only adds false positives.
        true_pos = n_pos - np.searchsorted(positives, values, "left")
        false_pos = n_neg - neg_below
        precision_sum += float(np.dot(counts, true_pos / (true_pos + false_pos)))
        f1 = 2.0 * true_pos / (true_pos + false_pos + n_pos)            # = 2tp / (2tp + fp + fn)
        best = f1.size - 1 - int(np.argmax(f1[::-1]))                  # last = highest threshold
        if f1[best] >= best_f1:
            best_f1, best_threshold = float(f1[best]), float(values[best])
    return _Ranking(twice_u / (2 * n_pos * n_neg), precision_sum / n_pos, best_f1, best_threshold)


def _ranking_of(scores: Any, labels: Any, what: str) -> _Ranking:
    """Validate, split, sort and sweep: the shared body of `roc_auc`, `average_precision`, `f1_max`."""
    scores, labels = _check_pair(scores, labels)
    positives, negatives = _split_sorted(scores, labels)
    _require_both_labels(positives.size, negatives.size, what)
    return _ranking(positives, negatives)


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve, exact and tie-aware: the value of `sklearn.metrics.roc_auc_score`.

    Parameters
    ----------
    scores: (...) real array or tensor, higher = more anomalous; any shape, e.g. (N,) or (N, H, W).
    labels: (...) bool or integer 0/1 array of the same shape, 1 = anomaly.

    Returns
    -------
    AUROC in [0, 1]; below 0.5 is returned as it is. Raises MetricError for empty or
    non-finite input, mismatched shapes, or labels of a single class.
    """
    return _ranking_of(scores, labels, "AUROC").auroc


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, sum over thresholds of (R_n - R_{n-1}) P_n, as `sklearn.metrics.average_precision_score`.

    Parameters
    ----------
    scores: (...) real array or tensor, higher = more anomalous.
    labels: (...) bool or integer 0/1 array of the same shape, 1 = anomaly.

    Returns
    -------
    AP in (0, 1] (step-wise, no interpolation). Raises MetricError as `roc_auc` does.
    """
    return _ranking_of(scores, labels, "AP").average_precision


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """The best F1 score over all thresholds, and the threshold that gives it.

    Parameters
    ----------
    scores: (...) real array or tensor, higher = more anomalous.
    labels: (...) bool or integer 0/1 array of the same shape, 1 = anomaly.

    Returns
    -------
    (f1, threshold): predicting "anomaly" where score >= threshold gives F1 = f1; the highest
    such threshold when several tie. Raises MetricError as `roc_auc` does.
    """
    ranking = _ranking_of(scores, labels, "F1-max")
    return ranking.f1_max, ranking.f1_threshold


# ------------------------------------------------------------------------------------------ AUPRO

def _check_maps_masks(maps: Any, masks: Any, map_name: str = "maps",
                      mask_name: str = "masks") -> tuple[np.ndarray, np.ndarray]:
    """Maps and boolean masks as (N, H, W) arrays of the same shape."""
    maps, masks = _check_pair(maps, masks, map_name, mask_name)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3:
        raise MetricError(f"{map_name} must have shape (N, H, W) or (H, W), got {maps.shape}")
    return maps, masks


class _RegionSteps(NamedTuple):
    """PRO as a step function of the threshold: the anomalous pixels' weight below each value."""

    values: np.ndarray          # (D,) distinct anomalous-pixel scores, ascending
    weight_below: np.ndarray    # (D + 1,) float64: [0, weight of pixels <= values[0], ..., total]


def _region_steps(maps: np.ndarray, masks: np.ndarray) -> _RegionSteps:
    """Label each mask's 8-connected regions and weigh every anomalous pixel by 1 / (|region| * R).

    Parameters
    ----------
    maps: (N, H, W) finite scores.
    masks: (N, H, W) bool, True = anomalous pixel.

    Returns
    -------
    _RegionSteps: PRO(t) = total - weight_below[searchsorted(values, t, "left")]. Raises
    MetricError when no mask has an anomalous pixel (PRO undefined).
    """
    n_anomalous = int(np.count_nonzero(masks))
    scores = np.empty(n_anomalous, dtype=maps.dtype)       # (P,) anomalous-pixel scores
    region = np.empty(n_anomalous, dtype=np.int64)         # (P,) global region id of each
    sizes = []
    filled = 0
    for image_map, mask in zip(maps, masks):
        if not mask.any():
            continue
        labelled, n_regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)   # (H, W) int32
        count = int(np.count_nonzero(mask))
        scores[filled:filled + count] = image_map[mask]
        region[filled:filled + count] = labelled[mask] + (len(sizes) - 1)   # labels start at 1
        sizes.extend(np.bincount(labelled.reshape(-1), minlength=n_regions + 1)[1:].tolist())
        filled += count
    if not sizes:
        raise MetricError("AUPRO is undefined: the masks hold no anomalous pixel, so there is no region")
    region_weight = 1.0 / (np.asarray(sizes, dtype=np.float64) * len(sizes))   # (R,)

    order = np.argsort(scores)
    scores = scores[order]
    region = region[order]
    del order
    # Cumulative weight per distinct value, block by block: float64 only over distinct values.
    values, weight_below, running = [], [np.zeros(1)], 0.0
    for start in range(0, n_anomalous, _BLOCK):
        block = scores[start:start + _BLOCK]
        distinct, counts = _runs(block)
        weight = region_weight[region[start:start + _BLOCK]]                 # (B,) float64
        sums = np.add.reduceat(weight, np.cumsum(counts) - counts)           # (D,) weight per value
        if start and block[0] == scores[start - 1]:   # the block opens inside the last block's last run
            running += float(sums[0])
            weight_below[-1][-1] = running
            distinct, sums = distinct[1:], sums[1:]
        if distinct.size:
            steps = running + np.cumsum(sums)
            values.append(distinct)
            weight_below.append(steps)
            running = float(steps[-1])
    return _RegionSteps(np.concatenate(values), np.concatenate(weight_below))


def _pro_area(negatives: np.ndarray, steps: _RegionSteps, fpr_limit: float, presorted: bool) -> float:
    """Normalised area under PRO(FPR) from FPR 0 to `fpr_limit`, exact over all distinct thresholds.

    Parameters
    ----------
    negatives: (M,) scores of the normal pixels; reordered in place.
    steps: the anomalous pixels' region weights, from `_region_steps`.
    fpr_limit: upper end of the FPR range, in (0, 1].
    presorted: whether `negatives` is already sorted ascending.

    Returns
    -------
    The area divided by `fpr_limit`, in [0, 1].
    """
    n_neg = negatives.size
    limit = fpr_limit * n_neg                  # the limit in normal pixels (FPR * M)
    n_top = math.ceil(limit)                   # normal pixels whose FPR step starts below the limit
    if not presorted:   # only the top n_top need an order: partition (linear), then sort those
        negatives.partition(n_neg - n_top)
        negatives[n_neg - n_top:].sort()
    top = negatives[n_neg - n_top:]            # (n_top,) ascending; everything before is <= top[0]
    total = float(steps.weight_below[-1])

    def pro(threshold: np.ndarray | float, side: str) -> np.ndarray:
        """PRO at `threshold`, counting pixels scoring >= it (side "left") or > it ("right")."""
        return total - steps.weight_below[np.searchsorted(steps.values, threshold, side)]

    # Between distinct normal scores the curve rises vertically (dFPR = 0); across a run of c tied
    # normal pixels at value b it is the straight segment from (#neg > b, PRO(> b)) to
    # (#neg >= b, PRO(>= b)), so each of those pixels adds (PRO(> b) + PRO(>= b)) / 2 to the
    # area in units of one normal pixel. Runs above the limit's run are whole:
    crossing = top[0]                          # the value of the run that reaches the limit
    n_above = top.size - int(np.searchsorted(top, crossing, "right"))
    area = 0.0
    for start in range(top.size - n_above, top.size, _BLOCK):
        distinct, counts = _runs(top[start:start + _BLOCK])
        area += 0.5 * float(np.dot(counts, pro(distinct, "right") + pro(distinct, "left")))
    # ... and the limit's run is cut where it crosses FPR = fpr_limit (linear interpolation).
    run = (top.size - n_above) + int(np.count_nonzero(negatives[:n_neg - n_top] == crossing))
    pro_above, pro_at = float(pro(crossing, "right")), float(pro(crossing, "left"))
    width = limit - n_above                    # in (0, run]
    pro_at_limit = pro_above + (pro_at - pro_above) * width / run
    area += width * 0.5 * (pro_above + pro_at_limit)
    return area / limit


def _check_fpr_limit(fpr_limit: float) -> float:
    """The FPR limit as a float in (0, 1]; MetricError otherwise."""
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise MetricError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def aupro(maps: Any, masks: Any, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Area under the per-region-overlap (PRO) curve up to an FPR limit, divided by the limit.

    Regions are the 8-connected components of each ground-truth mask. At a threshold t,
    PRO(t) is the mean over all regions of all images of the fraction of the region's pixels
    scoring >= t, and FPR(t) the fraction of normal pixels (of all images) scoring >= t. PRO is
    integrated over FPR from 0 to `fpr_limit` (trapezoids; the point at the limit is
    interpolated linearly) and divided by `fpr_limit`.

    Relation to MVTec AD: Bergmann et al. (IJCV 2021) define PRO over a sweep of thresholds and
    report the area up to FPR 0.3, normalised by 0.3. This is the exact version of that sweep:
    every distinct score is a threshold (one sort; each pixel of region r adds 1 / (|r| * R) to
    PRO once t falls to its score), and a run of tied scores is one straight segment. That is
    the curve the MVTec AD evaluation script builds (cumulative sums over all sorted pixels,
    one point per distinct score, trapezoid up to x_max = 0.3, divided by 0.3); implementations
    that sweep a fixed grid of thresholds (e.g. 200 steps between min and max) approximate it.

    Parameters
    ----------
    maps: (N, H, W) or (H, W) real array or tensor, higher = more anomalous.
    masks: bool or integer 0/1 array of the same shape, 1 = anomalous pixel.
    fpr_limit: upper end of the FPR range, in (0, 1]; 0.3 as in MVTec AD.

    Returns
    -------
    AUPRO in [0, 1]. Raises MetricError for empty or non-finite maps, mismatched shapes,
    masks without an anomalous pixel, or without a normal pixel.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    maps, masks = _check_maps_masks(maps, masks)
    steps = _region_steps(maps, masks)
    negatives = maps[~masks]
    _require_both_labels(1, negatives.size, "AUPRO")
    return _pro_area(negatives, steps, fpr_limit, presorted=False)


def _pixel_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO of one class, sharing one sort of the normal pixels.

    Parameters
    ----------
    maps: (N, H, W) finite scores.
    masks: (N, H, W) bool with at least one anomalous and one normal pixel.

    Returns
    -------
    {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"} -> float.
    """
    positives, negatives = _split_sorted(maps, masks)
    ranking = _ranking(positives, negatives)
    del positives
    aupro_value = _pro_area(negatives, _region_steps(maps, masks), AUPRO_FPR_LIMIT, presorted=True)
    return {
        "pixel_auroc": ranking.auroc,
        "pixel_ap": ranking.average_precision,
        "pixel_f1_max": ranking.f1_max,
        "pixel_aupro": aupro_value,
    }


# ------------------------------------------------------------------------------------ image score

def image_score_from_map(maps: Any, pool: int = POOL_SIZE) -> np.ndarray:
    """Image scores as the maximum of the anomaly map after `pool` x `pool` average pooling, stride 1.

    Parameters
    ----------
    maps: (N, H, W) real array or tensor with H, W >= pool.
    pool: side of the averaging window in pixels (16 in the protocol).

    Returns
    -------
    (N,) float64 array.
    """
    maps = _check_scores(maps, "anomaly maps")
    if maps.ndim != 3 or maps.shape[1] < pool or maps.shape[2] < pool:
        raise MetricError(f"anomaly maps must have shape (N, H, W) with H, W >= {pool}, got {maps.shape}")
    n_images, height, width = maps.shape
    scores = np.empty(n_images, dtype=np.float64)
    per_block = max(1, _BLOCK // (height * width))
    for start in range(0, n_images, per_block):
        block = maps[start:start + per_block].astype(np.float64)               # (B, H, W)
        # Box sums by differences of running sums, rows then columns (separable window).
        rows = np.zeros((block.shape[0], height + 1, width))
        np.cumsum(block, axis=1, out=rows[:, 1:])
        row_sums = rows[:, pool:] - rows[:, :-pool]                            # (B, H-pool+1, W)
        cols = np.zeros((block.shape[0], height - pool + 1, width + 1))
        np.cumsum(row_sums, axis=2, out=cols[:, :, 1:])
        box_sums = cols[:, :, pool:] - cols[:, :, :-pool]                       # (B, H-p+1, W-p+1)
        scores[start:start + block.shape[0]] = box_sums.reshape(block.shape[0], -1).max(axis=1) / pool**2
    return scores
