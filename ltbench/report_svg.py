"""Charts of the HTML report as inline SVG: plain text, no JavaScript, no fonts or files to fetch.

Each mark carries a `<title>` (shown on hover, read by screen readers and by the tests) and the
charts draw their own legends. Values are fractions in [0, 1] drawn on a 0-100 % axis; a
missing value (None or NaN) draws no mark and is labelled "N/A".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from ltbench.plots import HIGH_COLOUR, LOW_COLOUR

PIXEL_TINT = 0.55           # pixel AUROC bars: the group colour mixed this much with white
SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                  "#17becf", "#ff7f0e")  # matplotlib's tab10, High blue first
MARKERS = ("circle", "square", "diamond", "triangle")
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif"
PLOT_HEIGHT = 220           # px of the value axis
TOP, RIGHT = 34, 16         # px above the plot (legend) and right of it
LEFT = 48                   # px for the value axis labels


def is_missing(value: float | None) -> bool:
    """Whether a metric value is absent (None) or undefined (NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def tint(colour: str, amount: float) -> str:
    """`colour` (#rrggbb) mixed with white; `amount` 0 keeps it, 1 gives white."""
    channels = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in channels)


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>'
            f"{escape(text)}</text>")


def _value_axis(width: float) -> list[str]:
    """Horizontal grid lines and labels at 0, 25, 50, 75, 100 % over the plot's width."""
    parts = []
    for percent in (0, 25, 50, 75, 100):
        y = TOP + PLOT_HEIGHT * (1 - percent / 100)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + width:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="{"#444" if percent == 0 else "#ddd"}" stroke-width="1"/>')
        parts.append(_text(LEFT - 6, y + 4, f"{percent}", 10, "end"))
    return parts


def _legend(entries: Sequence[tuple[str, str]], y: float = 14) -> list[str]:
    """A one-line legend at the top: (colour, label) swatches from the left."""
    parts, x = [], LEFT
    for colour, label in entries:
        parts.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" fill="{colour}"/>')
        parts.append(_text(x + 16, y + 1, label, 11, "start"))
        x += 28 + 6.5 * len(label)
    return parts


def _svg(width: float, height: float, title: str, parts: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="{width:.0f}" height="{height:.0f}" style="{FONT}" aria-label="{escape(title)}">'
            f"<title>{escape(title)}</title>" + "".join(parts) + "</svg>")


def class_bar_chart(classes: Sequence[str], groups: Sequence[str], train_counts: Sequence[int | None],
                    image_values: Sequence[float | None], pixel_values: Sequence[float | None],
                    title: str) -> str:
    """Per-class image and pixel AUROC bars in the split's class order, coloured by group.

    Parameters: classes: the split's class order; groups: "high"/"low" per class;
    train_counts: training images per class (None: unknown), written under each class name so
    that the long tail shows on the axis; image_values, pixel_values: AUROC fractions per class.
    Returns: an `<svg>` element. Bar height = value x PLOT_HEIGHT px.
    """
    bar = 16
    width = max(44 * len(classes), 480)          # room for the legend and the axis title with few classes
    slot = width / len(classes)
    label_room = 8 + 6.2 * max([len(c) for c in classes] + [8])
    height = TOP + PLOT_HEIGHT + label_room + 24
    parts = _value_axis(width)
    for i, (name, group, count) in enumerate(zip(classes, groups, train_counts)):
        colour = HIGH_COLOUR if group == "high" else LOW_COLOUR
        left = LEFT + i * slot + (slot - 2 * bar) / 2
        for j, (metric, values, fill) in enumerate((("image AUROC", image_values, colour),
                                                    ("pixel AUROC", pixel_values, tint(colour, PIXEL_TINT)))):
            value, x = values[i], left + j * bar
            if is_missing(value):
                parts.append(_text(x + bar / 2, TOP + PLOT_HEIGHT - 4, "N/A", 8,
                                   extra=f'transform="rotate(-90 {x + bar / 2:.1f} {TOP + PLOT_HEIGHT - 4:.1f})"'))
                continue
            bar_height = PLOT_HEIGHT * max(0.0, min(1.0, value))
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{TOP + PLOT_HEIGHT - bar_height:.2f}" width="{bar - 1}" '
                         f'height="{bar_height:.2f}" fill="{fill}"><title>{escape(name)} ({group}): {metric} '
                         f"{100 * value:.2f}%</title></rect>")
        centre = LEFT + i * slot + slot / 2
        label = f"{name} ({count})" if count is not None else name
        y = TOP + PLOT_HEIGHT + 12
        parts.append(_text(centre + 3, y, label, 10, "end",
                           f'class="class-label" transform="rotate(-45 {centre + 3:.1f} {y:.1f})"'))
    parts.append(_text(14, TOP + PLOT_HEIGHT / 2, "AUROC (%)", 11,
                       extra=f'transform="rotate(-90 14 {TOP + PLOT_HEIGHT / 2:.1f})"'))
    parts.append(_text(LEFT + width / 2, height - 4, "class (training images), in the split's order", 11))
    parts += _legend([(HIGH_COLOUR, "High: image"), (tint(HIGH_COLOUR, PIXEL_TINT), "High: pixel"),
                      (LOW_COLOUR, "Low: image"), (tint(LOW_COLOUR, PIXEL_TINT), "Low: pixel")])
    return _svg(LEFT + width + RIGHT, height, title, parts)


def _marker(shape: str, x: float, y: float, colour: str, tooltip: str) -> str:
    title = f"<title>{escape(tooltip)}</title>"
    if shape == "square":
        return f'<rect class="point" x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}">{title}</rect>'
    if shape == "diamond":
        points = f"{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} {x - 5:.1f},{y:.1f}"
        return f'<polygon class="point" points="{points}" fill="{colour}">{title}</polygon>'
    if shape == "triangle":
        points = f"{x:.1f},{y - 5:.1f} {x + 5:.1f},{y + 4:.1f} {x - 5:.1f},{y + 4:.1f}"
        return f'<polygon class="point" points="{points}" fill="{colour}">{title}</polygon>'
    return f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}">{title}</circle>'


def count_scatter_chart(train_counts: dict[str, int], series: dict[str, dict[str, float | None]],
                        metric: str, title: str) -> str:
    """Each model's per-class value against the class's training-image count (log axis), one line per model.

    Parameters: train_counts: class -> training images (>= 1); series: model -> class -> value
    (fraction); metric: the value's name for labels ("image AUROC").
    Returns: an `<svg>` element; points of a model are joined in order of training images.
    """
    width = 440                                   # two charts side by side on a page
    height = TOP + PLOT_HEIGHT + 44
    low, high = math.log10(max(1, min(train_counts.values()))), math.log10(max(train_counts.values()))
    span = high - low if high > low else 1.0

    def x_of(count: int) -> float:
        return LEFT + 10 + (width - 20) * (math.log10(max(1, count)) - low) / span

    parts = _value_axis(width)
    decade = 10 ** math.floor(low)
    while decade <= 10 ** high * 1.0001:
        for step in (1, 2, 5):
            tick = decade * step
            if 10 ** low * 0.9999 <= tick <= 10 ** high * 1.0001:
                parts.append(_text(x_of(tick), TOP + PLOT_HEIGHT + 14, f"{tick:g}", 10))
        decade *= 10
    parts.append(_text(LEFT + width / 2, height - 6, "training images of the class (log scale)", 11))
    parts.append(_text(14, TOP + PLOT_HEIGHT / 2, f"{metric} (%)", 11,
                       extra=f'transform="rotate(-90 14 {TOP + PLOT_HEIGHT / 2:.1f})"'))
    legend = []
    for k, (model, values) in enumerate(series.items()):
        colour, shape = SERIES_COLOURS[k % len(SERIES_COLOURS)], MARKERS[k % len(MARKERS)]
        points = sorted((train_counts[c], c, v) for c, v in values.items() if c in train_counts and not is_missing(v))
        coordinates = [(x_of(n), TOP + PLOT_HEIGHT * (1 - max(0.0, min(1.0, v)))) for n, _, v in points]
        if len(coordinates) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.2" '
                         f'stroke-opacity="0.6"/>')
        for (n, name, v), (x, y) in zip(points, coordinates):
            parts.append(_marker(shape, x, y, colour, f"{model}: {name} ({n} training images) {metric} {100 * v:.2f}%"))
        legend.append((colour, model))
    parts += _legend(legend)
    return _svg(LEFT + width + RIGHT, height, title, parts)
