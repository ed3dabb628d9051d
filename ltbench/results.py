"""Writing a run's results: metrics.json, per_class.csv, scores.csv and the overlay PNGs under maps/.

File names come from `ltbench.rundir`; every file is written atomically (`ltbench.io`).
"""

from __future__ import annotations

import csv
import io as _text_io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ltbench import io
from ltbench.data import read_image_uint8
from ltbench.datasets.base import Catalog, Record
from ltbench.metrics import METRIC_KEYS, Evaluation
from ltbench.overlays import save_overlay, value_range
from ltbench.rundir import MAPS_DIR, METRICS_FILE, PER_CLASS_FILE, SCORES_FILE, VALUE_RANGES_FILE


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV table (LF line endings) atomically."""
    table = _text_io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    io.write_text(path, table.getvalue())


def unique_name(stem: str, used: set[str]) -> str:
    """`stem`, or `stem_2`, `stem_3`, ... if taken; the name returned is added to `used`."""
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def write_results(run_dir: Path, evaluation: Evaluation, model: str, split: str, records: Sequence[Record],
                  scores: np.ndarray, diagnostics: dict | None = None) -> None:
    """Write metrics.json, per_class.csv and scores.csv into a run directory.

    Parameters: evaluation: what `ltbench.metrics.evaluate` returned; model, split: their names
    ("ltad", "mvtec/exp100"); records: the N test records; scores: (N,) image scores in their order;
    diagnostics: the detector's `diagnostics_` (JSON-ready facts about the trained model), kept in
    metrics.json under "diagnostics" when given.
    """
    document = evaluation.to_json(model, split)
    if diagnostics:
        document["diagnostics"] = diagnostics
    io.write_json(run_dir / METRICS_FILE, document)
    write_csv(run_dir / PER_CLASS_FILE, ["class_name", "group", *METRIC_KEYS],
              ([name, values["group"], *(values.get(key, float("nan")) for key in METRIC_KEYS)]
               for name, values in evaluation.per_class.items()))
    write_csv(run_dir / SCORES_FILE, ["class_name", "image", "label", "defect_type", "score"],
              ([r.class_name, r.image, r.label, r.defect_type, repr(float(s))] for r, s in zip(records, scores)))


def select_overlays(labels: np.ndarray, scores: np.ndarray, count: int) -> list[int]:
    """Which images of one class get an overlay: the highest-scoring anomalies and the highest-scoring normal.

    Parameters: labels, scores: (N,) of the class's test images; count: how many to pick.
    Returns: positions into the arrays, at most `count`.
    """
    if count <= 0:
        return []
    by_score = np.argsort(-scores, kind="stable")
    anomalous = [int(i) for i in by_score if labels[i] == 1]
    normal = [int(i) for i in by_score if labels[i] == 0]
    chosen = anomalous[:count - 1] + normal[:1] if normal else anomalous[:count]
    rest = [i for i in anomalous + normal if i not in chosen]
    return (chosen + rest)[:count]


def write_overlays(run_dir: Path, catalog: Catalog, class_order: Sequence[str], records: Sequence[Record],
                   scores: np.ndarray, anomaly_maps: np.ndarray, masks: np.ndarray, per_class: int) -> int:
    """Write `per_class` overlay PNGs per class into maps/<class>/ and each class's colour range.

    Parameters: records: the N test records; scores: (N,); anomaly_maps, masks: (N, H, W), in
    the records' order. Returns: the number of PNGs written.
    """
    maps_dir = run_dir / MAPS_DIR
    ranges: dict[str, list[float]] = {}
    written = 0
    for class_name in class_order:
        positions = np.array([i for i, r in enumerate(records) if r.class_name == class_name], dtype=np.int64)
        if len(positions) == 0:
            continue
        low, high = value_range(anomaly_maps[positions])
        ranges[class_name] = [low, high]
        labels = np.array([records[i].label for i in positions])
        used: set[str] = set()
        for local in select_overlays(labels, scores[positions], per_class):
            i = int(positions[local])
            record = records[i]
            name = unique_name(f"{record.defect_type}_{Path(record.image).stem}", used)
            image, _ = read_image_uint8(catalog.path(record.image))
            title = f"{class_name} / {record.defect_type} / {Path(record.image).name}   score {scores[i]:.4g}"
            save_overlay(maps_dir / class_name / f"{name}.png", image, anomaly_maps[i], masks[i], (low, high), title)
            written += 1
    io.write_json(maps_dir / VALUE_RANGES_FILE, ranges)
    return written
