"""Benchmark: LTBench's exact pixel metrics against scikit-learn, torchmetrics and a reference AUPRO.

    python bench/metrics.py                      # 50 million pixels (about 1,000 maps of 224 x 224)
    python bench/metrics.py --pixels 2000000     # smaller and quicker

Synthetic maps: float32 scores quantised to steps of 1/4096 (so most pixels tie with many
others, as stored or low-resolution maps do), about 3 % anomalous pixels in elliptic defects on
half of the images. For each metric the table prints the value, its difference from LTBench's,
the time, the speed-up of LTBench over the reference, and the peak extra memory (numpy
allocations seen by tracemalloc, and the sampled growth of the process's resident memory,
which also sees torch's) relative to the input (maps + masks). The references:

- AUROC: `sklearn.metrics.roc_auc_score`, and torchmetrics' exact `binary_auroc`
  (thresholds=None) when torchmetrics is installed;
- AP: `sklearn.metrics.average_precision_score`;
- AUPRO: scikit-learn has none, so the reference is `reference_aupro` below, a straightforward
  float64 version of the MVTec AD evaluation script's method (one stable argsort of all
  pixels, cumulative sums, last point of each run of tied scores); and, on a few maps, a
  threshold-by-threshold sweep of the definition (`sweep_aupro`).

Not a timed test: timings depend on the machine and its load; run it twice.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltbench.datasets.base import ANOMALY, NORMAL, Record
from ltbench.evaluation import evaluate
from ltbench.metrics import aupro, average_precision, roc_auc

SIDE = 224                          # evaluation size of the protocol
LEVELS = 4096                       # scores are multiples of 1 / LEVELS by default: heavy ties
FPR_LIMIT = 0.3
TARGET_SPEEDUP, TARGET_DIFFERENCE, TARGET_MEMORY = 5.0, 1e-9, 2.0   # AUROC targets of the issue
MIB = 2.0**20


def synthetic_maps(n_pixels: int, seed: int, levels: int = LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Float32 anomaly maps (multiples of 1 / levels; levels 0: not quantised) and bool masks, (N, 224, 224)."""
    rng = np.random.default_rng(seed)
    n_images = max(1, round(n_pixels / SIDE**2))
    rows, cols = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    masks = np.zeros((n_images, SIDE, SIDE), dtype=bool)
    for index in np.flatnonzero(rng.random(n_images) < 0.5):   # half of the images have defects
        for _ in range(int(rng.integers(1, 4))):
            centre_row, centre_col = rng.uniform(20, SIDE - 20, 2)
            radius_row, radius_col = rng.uniform(10, 34, 2)
            masks[index] |= ((rows - centre_row) / radius_row) ** 2 + ((cols - centre_col) / radius_col) ** 2 <= 1
    maps = np.empty(masks.shape, dtype=np.float32)
    for start in range(0, n_images, 64):                      # (64, 224, 224) float32 at a time
        block = rng.standard_normal((min(64, n_images - start), SIDE, SIDE), dtype=np.float32)
        block *= 0.12
        block += 0.3 + 0.25 * masks[start:start + 64]
        np.clip(block, 0.0, 1.0, out=block)
        maps[start:start + 64] = np.round(block * levels) / levels if levels else block
    return maps, masks


def trapezoid_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Area under the points (fpr, pro), fpr ascending from 0, up to `limit` (interpolated), / limit."""
    inside = int(np.searchsorted(fpr, limit, "right"))       # points with fpr <= limit
    area = float(np.sum((fpr[1:inside] - fpr[:inside - 1]) * (pro[1:inside] + pro[:inside - 1]) / 2))
    if inside < fpr.size:                                      # cut the segment that crosses the limit
        x0, y0, x1, y1 = fpr[inside - 1], pro[inside - 1], fpr[inside], pro[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def region_weights(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) float64: 1 / (|region| * R) on each anomalous pixel (8-connected regions), 0 elsewhere."""
    weights = np.zeros(masks.shape)
    labelled = [ndimage.label(mask, structure=np.ones((3, 3))) for mask in masks]
    n_regions = sum(count for _, count in labelled)
    for weight, (labels, count) in zip(weights, labelled):
        sizes = np.bincount(labels.reshape(-1), minlength=count + 1)
        weight[labels > 0] = 1.0 / (sizes[labels[labels > 0]] * n_regions)
    return weights


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = FPR_LIMIT) -> float:
    """AUPRO the MVTec AD evaluation script's way: sort every pixel once, cumulate in float64."""
    order = np.argsort(maps.reshape(-1), kind="stable")[::-1]                 # descending scores
    scores = maps.reshape(-1)[order]
    pro = np.cumsum(region_weights(masks).reshape(-1)[order])
    fpr = np.cumsum(~masks.reshape(-1)[order]) / np.count_nonzero(~masks)
    last_of_run = np.append(scores[1:] != scores[:-1], True)                  # one point per distinct score
    return trapezoid_to_limit(np.append(0.0, fpr[last_of_run]), np.append(0.0, pro[last_of_run]), limit)


def sweep_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = FPR_LIMIT) -> float:
    """AUPRO by the definition: one threshold at a time, PRO as the mean of per-region overlaps."""
    regions = []
    for image_map, mask in zip(maps, masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [image_map[labels == k] for k in range(1, count + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        fpr.append(float(np.mean(normal >= threshold)))
        pro.append(float(np.mean([np.mean(region >= threshold) for region in regions])))
        if fpr[-1] > limit:
            break
    return trapezoid_to_limit(np.array(fpr), np.array(pro), limit)


class ResidentPeak:
    """Samples the process's resident memory every 2 ms in a thread, from creation to `stop()`."""

    def __init__(self) -> None:
        self.peak = self.start = self._resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._resident())

    def stop(self) -> None:
        """Stop sampling; take a last sample."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._resident())


def measure(function: Callable[[], float]) -> tuple[float, float, float, float]:
    """(value, seconds, peak extra bytes seen by tracemalloc, peak growth of resident memory)."""
    gc.collect()
    tracemalloc.start()
    resident = ResidentPeak()
    started = time.perf_counter()
    value = float(function())
    seconds = time.perf_counter() - started
    resident.stop()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, seconds, traced_peak, resident.peak - resident.start


def one_class_evaluation(maps: np.ndarray, masks: np.ndarray) -> Callable[[], float]:
    """evaluate() on all maps as one class: the 7 metrics a run computes (returns pixel AUROC)."""
    manifest = SimpleNamespace(name="synthetic/bench", class_order=["synthetic"], high=["synthetic"], low=[])
    records = [Record("synthetic", "test", ANOMALY if mask.any() else NORMAL, "synthetic", f"{i}.png")
               for i, mask in enumerate(masks)]
    return lambda: evaluate(manifest, records, None, maps, masks).per_class["synthetic"]["pixel_auroc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=50_000_000, help="about how many pixels (default 50M)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, default=LEVELS,
                        help=f"scores are multiples of 1/LEVELS (default {LEVELS}); 0 keeps them continuous")
    parser.add_argument("--sweep-maps", type=int, default=3, help="maps for the threshold-by-threshold check (0: skip it; slow for continuous scores)")
    args = parser.parse_args()

    maps, masks = synthetic_maps(args.pixels, args.seed, args.levels)
    input_bytes = maps.nbytes + masks.nbytes
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    print(f"{maps.size:,} pixels in {len(maps)} maps of {SIDE}x{SIDE}, float32, "
          f"{100 * masks.mean():.2f} % anomalous, {np.unique(maps[:64]).size:,} distinct scores in the first 64; "
          f"input (maps + masks) {input_bytes / MIB:.0f} MiB")

    rows: list[tuple[str, str, tuple[float, float, float, float]]] = []
    rows.append(("AUROC", "ltbench roc_auc", measure(lambda: roc_auc(maps, masks))))
    from sklearn.metrics import average_precision_score, roc_auc_score
    rows.append(("AUROC", "sklearn roc_auc_score", measure(lambda: roc_auc_score(flat_masks, flat_maps))))
    try:
        import torch
        from torchmetrics.functional.classification import binary_auroc
    except ImportError:
        print("torchmetrics is not installed: its row is left out (pip install torchmetrics)")
    else:
        preds, target = torch.from_numpy(flat_maps), torch.from_numpy(flat_masks)
        rows.append(("AUROC", "torchmetrics binary_auroc",
                     measure(lambda: binary_auroc(preds, target, thresholds=None).item())))
    rows.append(("AP", "ltbench average_precision", measure(lambda: average_precision(maps, masks))))
    rows.append(("AP", "sklearn average_precision_score",
                 measure(lambda: average_precision_score(flat_masks, flat_maps))))
    rows.append(("AUPRO", "ltbench aupro", measure(lambda: aupro(maps, masks))))
    rows.append(("AUPRO", "reference_aupro (MVTec-style)", measure(lambda: reference_aupro(maps, masks))))
    rows.append(("all 7", "ltbench evaluate, 1 class", measure(one_class_evaluation(maps, masks))))

    ours = {metric: result for metric, name, result in rows if name.startswith("ltbench")}
    header = (f"{'metric':<7} {'implementation':<32} {'value':>18} {'diff vs ltbench':>15} {'time s':>7} "
              f"{'ltbench faster':>14} {'peak extra (traced)':>21} {'peak extra (RSS)':>18}")
    print(header)
    print("-" * len(header))
    for metric, name, (value, seconds, traced, resident) in rows:
        own = name.startswith("ltbench")
        base = ours[metric]
        difference = "" if own else f"{value - base[0]:.1e}"
        speedup = "" if own else f"{seconds / base[1]:.1f}x"
        # tracemalloc sees numpy's allocations, not torch's
        traced_text = "n/a" if name.startswith("torchmetrics") else (
            f"{traced / MIB:.0f} MiB {traced / input_bytes:.2f}x")
        print(f"{metric:<7} {name:<32} {value:>18.15f} {difference:>15} {seconds:>7.2f} {speedup:>14} "
              f"{traced_text:>21} {resident / MIB:>7.0f} MiB {resident / input_bytes:>4.2f}x")

    few = slice(0, min(args.sweep_maps, len(maps)))
    if masks[few].any():
        started = time.perf_counter()
        swept = sweep_aupro(maps[few], masks[few])
        print(f"AUPRO on the first {few.stop} maps: ltbench {aupro(maps[few], masks[few]):.15f}, "
              f"threshold-by-threshold sweep {swept:.15f} ({time.perf_counter() - started:.1f} s)")

    value, seconds, traced, _ = ours["AUROC"]
    sklearn_value, sklearn_seconds = next(r[2][:2] for r in rows if r[1] == "sklearn roc_auc_score")
    checks = [
        (f"AUROC at least {TARGET_SPEEDUP:.0f}x faster than sklearn", sklearn_seconds / seconds >= TARGET_SPEEDUP),
        (f"AUROC within {TARGET_DIFFERENCE:.0e} of sklearn", abs(value - sklearn_value) <= TARGET_DIFFERENCE),
        (f"AUROC peak extra memory at most {TARGET_MEMORY:.0f}x the input", traced <= TARGET_MEMORY * input_bytes),
    ]
    for text, met in checks:
        print(f"{'met' if met else 'NOT MET':>7}: {text}")


if __name__ == "__main__":
    main()
