"""Figures: written with matplotlib's Agg canvas (no display, no global pyplot state), atomically."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ltbench.errors import ConfigError
from ltbench.io import atomic_path

HIGH_COLOUR = "#1f77b4"  # majority classes
LOW_COLOUR = "#ff7f0e"   # minority classes
FIGURE_FORMATS = ("png", "pdf", "svg")


def _save(figure: Figure, path: str | os.PathLike) -> None:
    """Write a figure atomically; the format comes from the file suffix."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(f"cannot write a figure to {path}: use a file name ending in "
                          f"{', '.join('.' + f for f in FIGURE_FORMATS)}")
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=fmt, dpi=150)


def plot_class_distribution(manifest, path: str | os.PathLike) -> None:
    """Bar chart of a split's training images per class, High/Low coloured (like the LTAD paper's Fig. 2a).

    Parameters: manifest: a `ltbench.splits.Manifest` (for a recipe-only manifest the target
    counts are drawn); path: the output file (.png, .pdf or .svg).
    """
    counts = manifest.target_counts if manifest.recipe_only else manifest.counts
    values = [counts[c] for c in manifest.class_order]
    colours = [HIGH_COLOUR if c in manifest.high else LOW_COLOUR for c in manifest.class_order]
    figure = Figure(figsize=(max(6.0, 0.5 * len(values) + 2.0), 4.0), layout="constrained")
    axes = figure.add_subplot()
    positions = range(len(values))
    axes.bar(positions, values, color=colours)
    if not manifest.recipe_only:
        axes.plot(positions, [manifest.target_counts[c] for c in manifest.class_order], "k--", linewidth=1,
                  label="recipe target")
    axes.set_xticks(list(positions), manifest.class_order, rotation=45, ha="right")
    axes.set_ylabel("target images per class" if manifest.recipe_only else "training images")
    axes.set_title(manifest.name)
    handles = [Patch(color=HIGH_COLOUR, label=f"High ({len(manifest.high)})"),
               Patch(color=LOW_COLOUR, label=f"Low ({len(manifest.low)})")]
    axes.legend(handles=handles + axes.get_legend_handles_labels()[0])
    _save(figure, path)
