"""Anomaly-map overlays: one PNG per image with the image, its ground truth and the heat map side by side.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import io as _bytes_io
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ltbench import io

COLORMAP = "jet"
HEAT_ALPHA = 0.5  # the heat map is blended over the image so that defects can be located


def _as_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def render_overlay(image: torch.Tensor | np.ndarray, anomaly_map: torch.Tensor | np.ndarray,
                   mask: torch.Tensor | np.ndarray | None, value_range: tuple[float, float],
                   title: str = "") -> bytes:
    """Draw image | ground truth | heat map as a PNG.

    Parameters: image: (3, H, W) float in [0, 1] or uint8; anomaly_map: (H, W) float;
    mask: (H, W) bool, or None where no ground truth exists (the panel says so);
    value_range: (low, high) map values mapped to the ends of the colour scale (use one range
    for all images of a class so that their heat maps compare); title: a line above the panels.
    Returns: the PNG file's bytes.
    """
    picture = _as_numpy(image)
    if picture.dtype != np.uint8:
        picture = np.clip(picture, 0.0, 1.0)
    picture = np.transpose(picture, (1, 2, 0))  # (H, W, 3)
    heat = _as_numpy(anomaly_map).astype(np.float32)
    low, high = value_range
    if not high > low:
        high = low + 1e-6

    figure = Figure(figsize=(9.0, 3.4), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    axes[0].imshow(picture)
    axes[0].set_title("image")
    if mask is None:
        axes[1].imshow(np.zeros(heat.shape), cmap="gray", vmin=0, vmax=1)
        axes[1].text(heat.shape[1] / 2, heat.shape[0] / 2, "no ground truth", color="white", ha="center", va="center")
    else:
        axes[1].imshow(_as_numpy(mask).astype(np.float32), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth")
    axes[2].imshow(picture)
    shown = axes[2].imshow(heat, cmap=COLORMAP, vmin=low, vmax=high, alpha=HEAT_ALPHA)
    axes[2].set_title("anomaly map")
    figure.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
    for axis in axes:
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png")
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
