"""A run's evaluation: per-class metrics, their High / Low / All means, metrics.json and the printed summary.

The metrics themselves are the exact functions of `ltbench.metrics`. Two kinds of missing
values are kept apart (DESIGN.md, "The detector contract"):
- a metric that is undefined for a class (a single label in its test set) is NaN and left out
  of the means, which say so with a footnote;
- a class the detector cannot score (`unscorable_classes_`) has null metrics, and every mean
  that includes it is null (N/A), as the paper prints it; nothing is imputed.
A detection-only detector (no anomaly maps) has null pixel metrics everywhere.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ltbench.datasets.base import ANOMALY, NORMAL, Record
from ltbench.errors import MetricError
from ltbench.metrics import (
    IMAGE_KEYS,
    METRIC_KEYS,
    PIXEL_KEYS,
    _check_maps_masks,
    _check_scores,
    _pixel_metrics,
    _ranking,
    _split_sorted,
    image_score_from_map,
)
from ltbench.missing import GROUPS, MISSING, NO_MAPS, groups_holding, unscored_text

_COLUMN_TITLES = {
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1_max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
    "pixel_aupro": "pixel AUPRO",
}
# The paper's two headline columns first, then the extra metrics.
_SUMMARY_COLUMNS = ("image_auroc", "pixel_auroc", "image_ap", "image_f1_max", "pixel_ap", "pixel_f1_max",
                    "pixel_aupro")


class MetricWarning(UserWarning):
    """A metric was left undefined (NaN) for a class, e.g. because its test set has a single label."""


@dataclass
class Evaluation:
    """Per-class metrics and their High / Low / All means, as `evaluate` returns them."""

    per_class: dict[str, dict[str, float | str]]       # class -> {"group": "high"|"low", metric: value}
    summary: dict[str, dict[str, float]]                # "all"|"high"|"low" -> metric -> mean over classes
    excluded: dict[str, list[str]] = field(default_factory=dict)   # metric -> classes left out (NaN)
    warnings: list[str] = field(default_factory=list)   # one sentence per undefined class metric
    unscored: dict[str, str] = field(default_factory=dict)  # class the detector cannot score -> reason
    detection_only: bool = False                        # no anomaly maps: every pixel metric is null

    def to_json(self, model: str, split: str) -> dict[str, Any]:
        """The metrics.json document of DESIGN.md, fractions in [0, 1], NaN written as null.

        Parameters
        ----------
        model: detector name, e.g. "ltad".
        split: split name, e.g. "mvtec/exp100".

        Returns
        -------
        {"model", "split", "per_class": {class: {"group", 7 metrics}}, "summary": {"all"|"high"|"low":
        {7 metrics}}, "unscored": {class: reason}, "detection_only": bool}
        """
        def number(value: float | None) -> float | None:
            return None if value is None or math.isnan(value) else float(value)

        return {
            "model": model,
            "split": split,
            "per_class": {
                name: {"group": row["group"], **{key: number(row[key]) for key in METRIC_KEYS}}
                for name, row in self.per_class.items()
            },
            "summary": {group: {key: number(self.summary[group][key]) for key in METRIC_KEYS}
                        for group in GROUPS},
            "unscored": dict(self.unscored),
            "detection_only": self.detection_only,
        }

    def format_summary(self) -> str:
        """The All / High / Low table in percent with two decimals, and footnotes on missing values.

        Returns
        -------
        Multi-line text: one header row, rows All, High, Low (with their class counts), one
        column per metric, N/A for a null mean; a column marked * left classes out of its mean
        (listed below); further lines name the classes the detector could not score and say
        when the detector gives no anomaly maps.
        """
        counts = {"all": len(self.per_class)}
        for group in ("high", "low"):
            counts[group] = sum(1 for row in self.per_class.values() if row["group"] == group)
        titles = [_COLUMN_TITLES[key] + ("*" if self.excluded.get(key) else "") for key in _SUMMARY_COLUMNS]
        labels = [f"{group.capitalize()} ({counts[group]})" for group in GROUPS]
        label_width = max(len("group"), *(len(label) for label in labels))
        lines = ["  ".join(["group".ljust(label_width), *titles])]
        for group, label in zip(GROUPS, labels):
            cells = []
            for key, title in zip(_SUMMARY_COLUMNS, titles):
                value = self.summary[group][key]   # None where read back from metrics.json's null
                missing = value is None or math.isnan(value)
                cells.append((MISSING if missing else f"{100.0 * value:.2f}").rjust(len(title)))
            lines.append("  ".join([label.ljust(label_width), *cells]))
        by_classes: dict[tuple[str, ...], list[str]] = {}
        for key in _SUMMARY_COLUMNS:
            if self.excluded.get(key):
                by_classes.setdefault(tuple(self.excluded[key]), []).append(_COLUMN_TITLES[key])
        for classes, columns in by_classes.items():
            named = "every metric" if len(columns) == len(_SUMMARY_COLUMNS) else ", ".join(columns)
            lines.append(f"* {named}: left out of the means (undefined, NaN): {', '.join(classes)}")
        if self.unscored:
            lines.append(f"{MISSING} in {', '.join(groups_holding(self.per_class, self.unscored))}: the detector "
                         f"cannot score {unscored_text(self.unscored)}")
        if self.detection_only:
            lines.append(f"{MISSING} pixel metrics: {NO_MAPS}")
        return "\n".join(lines)


def aggregate(per_class: Mapping[str, Mapping[str, Any]], unscored: Sequence[str] = ()
              ) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """All / High / Low arithmetic means of per-class metrics.

    Parameters
    ----------
    per_class: class -> {"group": "high" | "low", metric key: float (NaN = undefined)}.
    unscored: classes the detector could not score: every mean over a group that holds one is
        NaN (null), never a mean over the other classes.

    Returns
    -------
    (summary, excluded): summary["all"|"high"|"low"][metric] is the mean over the group's classes
    with a defined value (NaN when none has one, or when the group holds an unscored class);
    excluded[metric] lists the scored classes whose NaN value was left out.
    """
    summary: dict[str, dict[str, float]] = {group: {} for group in GROUPS}
    excluded: dict[str, list[str]] = {}
    unscored = set(unscored)
    for key in METRIC_KEYS:
        excluded[key] = [name for name, row in per_class.items() if name not in unscored and math.isnan(row[key])]
        for group in GROUPS:
            members = [name for name, row in per_class.items() if group == "all" or row["group"] == group]
            values = [float(per_class[name][key]) for name in members if not math.isnan(per_class[name][key])]
            undefined = not values or any(name in unscored for name in members)
            summary[group][key] = math.nan if undefined else math.fsum(values) / len(values)
    return summary, excluded


def _contiguous(indices: np.ndarray) -> slice | np.ndarray:
    """A slice when the sorted indices are one run (a view of the arrays, no copy), else the indices."""
    if indices[-1] - indices[0] + 1 == indices.size:
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices


def _undefined(name: str, metrics: str, reason: str, notes: list[str]) -> None:
    """Record and emit the warning that a class's metrics are NaN and left out of the means."""
    message = f"class {name!r}: {reason}; its {metrics} metrics are NaN and left out of the means"
    notes.append(message)
    warnings.warn(message, MetricWarning, stacklevel=3)


def evaluate(manifest: Any, records: Sequence[Record], image_scores: Any, anomaly_maps: Any,
             masks: Any, unscored: Mapping[str, str] | None = None) -> Evaluation:
    """Per-class image and pixel metrics of a detector's test outputs, with High / Low / All means.

    Classes are those of `manifest.class_order` that have test records, in that order, plus the
    `unscored` ones. Image AUROC / AP / F1-max use the image scores (or, when None, the max of
    the 16x16 average-pooled map); pixel AUROC / AP / F1-max / AUPRO use every pixel of the
    class's test images. A class whose test set has one image label (or whose masks have no
    anomalous, or no normal, pixel) gets NaN for those metrics, a MetricWarning naming it, and
    is left out of the means. Without anomaly maps (a detection-only detector) every pixel
    metric is NaN, without warnings. An unscored class gets NaN for every metric, and every mean
    over a group holding it is NaN.

    Parameters
    ----------
    manifest: the split manifest; only `name`, `class_order`, `high` and `low` are used.
    records: N test Records of the scored classes, in the order of the arrays.
    image_scores: (N,) real array or tensor, or None to derive them from the maps.
    anomaly_maps: (N, H, W) real array or tensor (H = W = 224 in the protocol), or None
        (detection only; then `image_scores` is required and `masks` is not used).
    masks: (N, H, W) bool or 0/1 array, True = anomalous pixel; may be None without maps.
    unscored: class -> reason, for the classes the detector cannot score (their test images
        are not among `records`).

    Returns
    -------
    Evaluation. Raises MetricError for empty input, length or shape mismatches, NaN or
    infinite scores, and classes or groups the manifest does not know.
    """
    records = list(records)
    unscored = dict(unscored or {})
    if not records:
        raise MetricError("evaluate needs at least one test record, got none")
    detection_only = anomaly_maps is None
    if detection_only:
        if image_scores is None:
            raise MetricError("evaluate needs image scores when there are no anomaly maps (detection only)")
        maps = masks = None
    else:
        maps, masks = _check_maps_masks(anomaly_maps, masks, "anomaly maps", "masks")
        if maps.shape[0] != len(records):
            raise MetricError(
                f"got {len(records)} test records but {maps.shape[0]} anomaly maps; "
                "records and arrays must list the same images in the same order"
            )
    if image_scores is None:
        image_scores = image_score_from_map(maps)
    else:
        image_scores = _check_scores(image_scores, "image scores")
        if image_scores.shape != (len(records),):
            raise MetricError(
                f"image scores must have shape ({len(records)},), one per test record, got {image_scores.shape}"
            )

    class_order = list(manifest.class_order)
    high, low = set(manifest.high), set(manifest.low)
    unknown = sorted(({r.class_name for r in records} | set(unscored)) - set(class_order))
    if unknown:
        raise MetricError(f"test records or unscored classes {unknown} are not in split {manifest.name}'s class order")
    scored_unscored = sorted({r.class_name for r in records} & set(unscored))
    if scored_unscored:
        raise MetricError(f"classes {scored_unscored} are unscored but have scored test records")
    class_of = np.array([class_order.index(r.class_name) for r in records])        # (N,)
    labels = np.array([r.label for r in records])                                   # (N,)
    if not np.isin(labels, (NORMAL, ANOMALY)).all():
        raise MetricError(f"record labels must be {NORMAL} (normal) or {ANOMALY} (anomaly)")

    per_class: dict[str, dict[str, float | str]] = {}
    notes: list[str] = []
    for index, name in enumerate(class_order):
        members = np.flatnonzero(class_of == index)
        if members.size == 0 and name not in unscored:
            continue
        if name not in high and name not in low:
            raise MetricError(f"class {name!r} is in neither the High nor the Low list of split {manifest.name}")
        row: dict[str, float | str] = {"group": "high" if name in high else "low"}
        per_class[name] = row
        if name in unscored:
            row.update(dict.fromkeys(METRIC_KEYS, math.nan))
            continue
        class_labels = labels[members] == ANOMALY
        n_anomalous = int(np.count_nonzero(class_labels))
        if 0 < n_anomalous < members.size:
            ranking = _ranking(*_split_sorted(image_scores[members], class_labels))
            row.update(image_auroc=ranking.auroc, image_ap=ranking.average_precision,
                       image_f1_max=ranking.f1_max)
        else:
            row.update(dict.fromkeys(IMAGE_KEYS, math.nan))
            only = "anomalous" if n_anomalous else "normal"
            _undefined(name, "image", f"its {members.size} test images are all {only}", notes)
        if detection_only:
            row.update(dict.fromkeys(PIXEL_KEYS, math.nan))
            continue
        selected = _contiguous(members)
        class_maps, class_masks = maps[selected], masks[selected]                   # (n, H, W)
        n_anomalous_pixels = int(np.count_nonzero(class_masks))
        if 0 < n_anomalous_pixels < class_masks.size:
            row.update(_pixel_metrics(class_maps, class_masks))
        else:
            row.update(dict.fromkeys(PIXEL_KEYS, math.nan))
            what = "no anomalous pixel" if n_anomalous_pixels == 0 else "no normal pixel"
            _undefined(name, "pixel", f"its test masks have {what}", notes)
    summary, excluded = aggregate(per_class, unscored)
    if detection_only:  # no class is "left out": no class has pixel metrics at all
        excluded.update({key: [] for key in PIXEL_KEYS})
    return Evaluation(per_class=per_class, summary=summary, excluded=excluded, warnings=notes,
                      unscored={name: unscored[name] for name in class_order if name in unscored},
                      detection_only=detection_only)
