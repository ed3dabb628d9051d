"""`ltbench predict`: score new images with a finished run's model and write their overlays."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltbench.data import load_image
from ltbench.detector import check_prediction, resolve_detector
from ltbench.errors import ConfigError, RunError
from ltbench.metrics import image_score_from_map
from ltbench.overlays import save_overlay, value_range
from ltbench.results import unique_name, write_csv
from ltbench.run_config import choose_device
from ltbench.rundir import MAPS_DIR, MODEL_DIR, SCORES_FILE, VALUE_RANGES_FILE, read_run_record


@dataclass
class ImagePrediction:
    """The score of one new image and where its overlay went."""

    image: Path
    class_name: str
    score: float
    overlay: Path


def predict_images(run_dir: Path, images: Sequence[Path], class_name: str, out_dir: Path,
                   device: str | None = None, batch_size: int = 16) -> list[ImagePrediction]:
    """Score new images with a finished run's model; write scores.csv and one overlay per image.

    Parameters: run_dir: a run directory; images: image files; class_name: their class (one of
    the run's classes); out_dir: where scores.csv and the overlays go.
    Returns: one `ImagePrediction` per image, in order.
    """
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    if not (run_dir / MODEL_DIR).is_dir():
        raise RunError(f"{run_dir / MODEL_DIR} is missing; {run_dir} is not a finished run")
    classes = list(record.get("class_order", []))
    if class_name not in classes:
        raise ConfigError(f"--class {class_name!r} is not a class of run {run_dir}; its classes: {', '.join(classes)}")
    if not images:
        raise ConfigError("give at least one image to predict")
    spec = resolve_detector(record["detector"])
    torch_device, _ = choose_device(device)
    detector = spec.cls.load(run_dir / MODEL_DIR)
    ranges_path = run_dir / MAPS_DIR / VALUE_RANGES_FILE
    ranges = json.loads(ranges_path.read_text()) if ranges_path.is_file() else {}
    index = classes.index(class_name)

    paths = [Path(p) for p in images]
    loaded = [load_image(p) for p in paths]  # read all first: a bad file fails before anything is written
    all_maps: list[np.ndarray] = []
    all_scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(loaded), batch_size):
            batch = torch.stack(loaded[start:start + batch_size])                 # (B, 3, 224, 224)
            class_idx = torch.full((len(batch),), index, dtype=torch.int64)       # (B,)
            prediction = detector.predict(batch.to(torch_device), class_idx.to(torch_device))
            scores, maps = check_prediction(prediction, len(batch), spec.name)
            maps_np = maps.float().numpy()                                       # (B, 224, 224)
            all_maps.extend(maps_np)
            all_scores.extend(float(s) for s in (image_score_from_map(maps_np) if scores is None else scores))
    low, high = ranges.get(class_name) or value_range(np.stack(all_maps))

    out_dir = Path(out_dir)
    used: set[str] = set()
    results: list[ImagePrediction] = []
    for path, image, heat, score in zip(paths, loaded, all_maps, all_scores):
        overlay = out_dir / f"{unique_name(path.stem, used)}.png"
        save_overlay(overlay, image, heat, None, (low, high), f"{class_name} / {path.name}   score {score:.4g}")
        results.append(ImagePrediction(image=path, class_name=class_name, score=score, overlay=overlay))
    write_csv(out_dir / SCORES_FILE, ["image", "class_name", "score", "overlay"],
              ([str(r.image), r.class_name, repr(r.score), str(r.overlay)] for r in results))
    return results
