"""Anomaly-map overlays: one PNG per image with the image, its ground truth and the heat map side by side.

The panels are composed as one pixel array (the heat map coloured with a matplotlib colormap
and blended over the image) and written through matplotlib's Agg canvas with `figimage`, which
avoids laying out axes: about 0.1 s per PNG. No pyplot, no global state, no display needed.
"""

from __future__ import annotations

import io as _bytes_io
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ltbench import io

COLORMAP = "jet"
HEAT_ALPHA = 0.5  # the heat map is blended over the image so that defects can be located
GAP = 8           # white pixels between panels
HEADER = 44       # pixels above the panels for the title and the panel labels


def _as_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def compose_panels(image: torch.Tensor | np.ndarray, anomaly_map: torch.Tensor | np.ndarray,
                   mask: torch.Tensor | np.ndarray | None, value_range: tuple[float, float]) -> np.ndarray:
    """The three panels as one RGB array: image | ground truth | heat map blended over the image.

    Parameters: as `render_overlay`. Returns: (H, 3 W + 2 GAP, 3) float in [0, 1].
    """
    picture = _as_numpy(image).astype(np.float32)
    if picture.max() > 1.0:
        picture = picture / 255.0
    picture = np.clip(np.transpose(picture, (1, 2, 0)), 0.0, 1.0)  # (H, W, 3)
    heat = _as_numpy(anomaly_map).astype(np.float32)
    low, high = value_range
    scaled = np.clip((heat - low) / (high - low if high > low else 1e-6), 0.0, 1.0)
    colours = colormaps[COLORMAP](scaled)[..., :3]                  # (H, W, 3)
    blended = (1.0 - HEAT_ALPHA) * picture + HEAT_ALPHA * colours
    if mask is None:
        truth = np.zeros_like(picture)                               # no ground truth: a black panel, labelled
    else:
        truth = np.repeat(_as_numpy(mask).astype(np.float32)[..., None], 3, axis=2)
    gap = np.ones((picture.shape[0], GAP, 3), dtype=np.float32)
    return np.concatenate([picture, gap, truth, gap, blended], axis=1)


def render_overlay(image: torch.Tensor | np.ndarray, anomaly_map: torch.Tensor | np.ndarray,
                   mask: torch.Tensor | np.ndarray | None, value_range: tuple[float, float],
                   title: str = "") -> bytes:
    """Draw image | ground truth | heat map side by side as a PNG (matplotlib, Agg canvas).

    Parameters: image: (3, H, W) float in [0, 1] or uint8; anomaly_map: (H, W) float;
    mask: (H, W) bool, or None where no ground truth exists (the panel says so);
    value_range: (low, high) map values mapped to the ends of the colour scale (use one range
    for all images of a class so that their heat maps compare); title: a line above the panels.
    Returns: the PNG file's bytes.
    """
    panels = compose_panels(image, anomaly_map, mask, value_range)
    height, width = panels.shape[:2]
    panel = (width - 2 * GAP) // 3
    dpi = 100
    figure = Figure(figsize=(width / dpi, (height + HEADER) / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    figure.figimage(panels, xo=0, yo=0, origin="upper")  # pixel-exact, no axes to lay out (fast)
    top = height / (height + HEADER)
    for i, label in enumerate(("image", "ground truth" if mask is not None else "no ground truth",
                               f"anomaly map [{value_range[0]:.3g}, {value_range[1]:.3g}]")):
        figure.text((i * (panel + GAP) + panel / 2) / width, top + 0.02, label, ha="center", va="bottom", fontsize=8)
    if title:
        figure.text(0.5, 0.99, title, ha="center", va="top", fontsize=9)
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_overlay(path: str | Path, image: torch.Tensor | np.ndarray, anomaly_map: torch.Tensor | np.ndarray,
                 mask: torch.Tensor | np.ndarray | None, value_range: tuple[float, float], title: str = "") -> None:
    """Write `render_overlay(...)` to `path` atomically (parameters as there)."""
    io.write_bytes(path, render_overlay(image, anomaly_map, mask, value_range, title))


def value_range(maps: np.ndarray, upper_quantile: float = 0.999) -> tuple[float, float]:
    """The colour range for a set of maps: their minimum and a high quantile (robust to a few hot pixels).

    Parameters: maps: (N, H, W) float. Returns: (low, high) as Python floats.
    """
    flat = np.asarray(maps, dtype=np.float64).ravel()
    low = float(flat.min())
    high = float(np.quantile(flat, upper_quantile))
    return low, (high if high > low else float(flat.max()))
