"""Drawing primitives of the synthetic set, vectorised over the whole image (numpy only)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy.special import erfinv

from ltbench.datasets.synth.classes import IMAGE_SIZE

SIZE = IMAGE_SIZE
CENTRE = SIZE / 2.0
PIXEL_Y, PIXEL_X = (np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5)   # pixel centres, (H, W) each
UNIT_X, UNIT_Y = (PIXEL_X - CENTRE) / CENTRE, (PIXEL_Y - CENTRE) / CENTRE                    # the same in [-1, 1], for lighting
SENSOR_NOISE = 1.5          # std of the Gaussian sensor noise, in 8-bit levels
MIN_DEFECT_PIXELS = 40      # a drawn defect smaller than this (after clipping) is redrawn
# Gaussian quantiles at the 256 byte levels: sensor noise is drawn as random bytes looked up here,
# several times faster than rng.normal and indistinguishable at 8-bit output.
NOISE_TABLE = (math.sqrt(2.0) * SENSOR_NOISE * erfinv((np.arange(256) + 0.5) / 128.0 - 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Drawing primitives (vectorised over the whole image)


def rgb(values: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def jitter_colour(rng: np.random.Generator, base: tuple[float, float, float], amount: float,
                   tint: float | None = None) -> np.ndarray:
    """A class colour varied per image: a shared brightness shift (std `amount`) plus a per-channel
    one (std `tint`, default amount / 2; metals use a small one so they stay grey)."""
    shift = rng.normal(0.0, amount) + rng.normal(0.0, amount / 2 if tint is None else tint, 3)
    return np.clip(rgb(base) + shift.astype(np.float32), 0.02, 0.85)


def local_frame(cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) of every pixel in a frame centred at (cx, cy) and turned by `angle`."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = PIXEL_X - np.float32(cx), PIXEL_Y - np.float32(cy)
    return dx * c + dy * s, dy * c - dx * s


def select(condition: np.ndarray, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """np.where that stays float32 when given Python floats."""
    return np.where(condition, np.asarray(a, np.float32), np.asarray(b, np.float32))


def box_window(x: float, y: float, half_x: float, half_y: float) -> tuple[slice, slice]:
    """Row and column slices of the image box around (x, y) with the given half sizes (+ 2 px)."""
    return (slice(max(int(y - half_y) - 2, 0), min(int(y + half_y) + 3, SIZE)),
            slice(max(int(x - half_x) - 2, 0), min(int(x + half_x) + 3, SIZE)))


def coverage_of(sdf: np.ndarray) -> np.ndarray:
    """Antialiased coverage in [0, 1] of a signed distance (pixels, negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def box_sdf(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float, radius: float = 0.0) -> np.ndarray:
    """Signed distance to a rounded rectangle centred at the origin of (u, v)."""
    qu = np.abs(u) - (half_u - radius)
    qv = np.abs(v) - (half_v - radius)
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0) - radius


def paint(image: np.ndarray, colour: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Composite `colour` ((3,) or (H, W, 3)) over `image` with `coverage` (H, W)."""
    return image + (colour - image) * coverage[..., None]


def value_noise(rng: np.random.Generator, cell: float, angle: float = 0.0, stretch: float = 1.0,
           smooth: bool = True) -> np.ndarray:
    """Value noise of roughly unit std with features `cell` pixels apart (x `stretch` along `angle`).

    A small random grid is resampled by an affine map, so the noise can be anisotropic and turned
    with the surface it belongs to. Returns (H, W) float32.
    """
    cell_u, cell_v = cell * stretch, cell
    n_u = math.ceil(SIZE * 1.5 / cell_u) + 4
    n_v = math.ceil(SIZE * 1.5 / cell_v) + 4
    grid = Image.fromarray(rng.standard_normal((n_v, n_u)).astype(np.float32))
    # smooth noise is resampled at a fraction of the image size, then enlarged: same look, far cheaper
    step = 1 if not smooth or min(cell_u, cell_v) < 6 else 2 if min(cell_u, cell_v) < 16 else 4
    c, s = math.cos(angle) * step, math.sin(angle) * step
    # output pixel (x, y) -> grid (u / cell_u + n_u / 2, v / cell_v + n_v / 2), u/v about the centre
    data = (c / cell_u, s / cell_u, n_u / 2 - CENTRE * (c + s) / (cell_u * step),
            -s / cell_v, c / cell_v, n_v / 2 - CENTRE * (c - s) / (cell_v * step))
    resample = Image.Resampling.BICUBIC if smooth else Image.Resampling.BILINEAR
    out = grid.transform((SIZE // step, SIZE // step), Image.Transform.AFFINE, data, resample=resample)
    if step > 1:
        out = out.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(out) * np.float32(1.1 if smooth else 1.5)


def fbm(rng: np.random.Generator, cell: float, octaves: int) -> np.ndarray:
    """Fractal noise: octaves of `value_noise` at halving cell sizes and amplitudes."""
    total = np.zeros((SIZE, SIZE), np.float32)
    for octave in range(octaves):
        total += value_noise(rng, cell / 2**octave) * np.float32(0.5**octave)
    return total


def polyline_distance(points: np.ndarray, pad: float) -> np.ndarray:
    """Distance (pixels) of every pixel to a polyline of (x, y) `points`; inf beyond `pad` of its box.

    Returns (H, W) float32.
    """
    lo = np.floor(points.min(axis=0) - pad).astype(int).clip(0, SIZE)
    hi = np.ceil(points.max(axis=0) + pad + 1).astype(int).clip(0, SIZE)
    distance = np.full((SIZE, SIZE), np.inf, np.float32)
    if lo[0] >= hi[0] or lo[1] >= hi[1]:
        return distance
    px = PIXEL_X[lo[1]:hi[1], lo[0]:hi[0]][None]          # (1, h, w)
    py = PIXEL_Y[lo[1]:hi[1], lo[0]:hi[0]][None]
    a, b = points[:-1].astype(np.float32), points[1:].astype(np.float32)
    ab = b - a
    length2 = np.maximum((ab**2).sum(axis=1), 1e-6)
    ax, ay = a[:, 0, None, None], a[:, 1, None, None]
    abx, aby = ab[:, 0, None, None], ab[:, 1, None, None]
    t = np.clip(((px - ax) * abx + (py - ay) * aby) / length2[:, None, None], 0.0, 1.0)   # (n, h, w)
    d = np.hypot(px - ax - t * abx, py - ay - t * aby).min(axis=0)
    distance[lo[1]:hi[1], lo[0]:hi[0]] = d
    return distance


def bezier(control: np.ndarray, n: int = 24) -> np.ndarray:
    """n points of the Bezier curve through (k, 2) control points (de Casteljau)."""
    t = np.linspace(0.0, 1.0, n)[:, None, None]
    points = np.broadcast_to(control[None], (n, *control.shape)).astype(np.float64)
    while points.shape[1] > 1:
        points = points[:, :-1] * (1 - t) + points[:, 1:] * t
    return points[:, 0]


def blob_sdf(rng: np.random.Generator, cx: float, cy: float, radius: float, roughness: float) -> np.ndarray:
    """Approximate signed distance to an irregular blob: a circle with a random wavy radius."""
    dx, dy = PIXEL_X - np.float32(cx), PIXEL_Y - np.float32(cy)
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    wave = np.ones_like(r)
    for k, (amp, phase) in enumerate(zip(rng.normal(0.0, roughness, 5), rng.uniform(0, 2 * math.pi, 5)), 1):
        wave += np.float32(amp / k) * np.cos(k * phi + np.float32(phase))
    return r - np.float32(radius) * np.maximum(wave, 0.35)


def pick_point(rng: np.random.Generator, region: np.ndarray) -> tuple[float, float]:
    """A uniformly drawn (x, y) inside a boolean region (H, W)."""
    flat = np.flatnonzero(region)
    if flat.size == 0:
        raise AssertionError("synth: empty region to place a defect in")
    y, x = divmod(int(flat[rng.integers(flat.size)]), SIZE)
    return x + float(rng.uniform()), y + float(rng.uniform())
