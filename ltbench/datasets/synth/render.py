"""Rendering one sample: a scene per class, the defect painters, lighting and sensor noise."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ltbench.datasets.synth.classes import CLASS_ORDER, DEFECTS
from ltbench.datasets.synth.draw import (
    CENTRE,
    MIN_DEFECT_PIXELS,
    NOISE_TABLE,
    PIXEL_X,
    PIXEL_Y,
    SIZE,
    UNIT_X,
    UNIT_Y,
    bezier,
    blob_sdf,
    box_sdf,
    box_window,
    coverage_of,
    fbm,
    jitter_colour,
    local_frame,
    paint,
    pick_point,
    polyline_distance,
    rgb,
    select,
    value_noise,
)
from ltbench.errors import DatasetError

# ----------------------------------------------------------------------------------------------
# Scenes: one renderer per class


@dataclass
class _Scene:
    """A clean rendered surface before lighting, with what the defect painters need to know."""

    albedo: np.ndarray                       # (H, W, 3) float32 in [0, 1]
    support: np.ndarray                      # (H, W) bool: where surface defects may lie
    background: np.ndarray                   # (H, W, 3) what shows where a part goes missing
    hole_colour: np.ndarray                  # (3,) what shows through a hole
    texture: bool                            # texture (defects anywhere) or object (on the part)
    parts: list[np.ndarray] = field(default_factory=list)   # (H, W) coverage of removable parts
    chip_region: np.ndarray | None = None    # (H, W) bool: centres of chipped-off pieces of parts[0]
    chip_radius: tuple[float, float] = (10.0, 16.0)          # radius range of a chipped-off piece
    axis: float | None = None                # main axis of a thin object: scratches follow it


_CENTRAL = (np.abs(PIXEL_X - CENTRE) < CENTRE - 36) & (np.abs(PIXEL_Y - CENTRE) < CENTRE - 36)   # defect centres on textures


def _texture_scene(albedo: np.ndarray, background: np.ndarray | None = None,
                   parts: list[np.ndarray] | None = None) -> _Scene:
    return _Scene(
        albedo=albedo, support=np.ones((SIZE, SIZE), bool),
        background=albedo if background is None else background,
        hole_colour=rgb((0.03, 0.03, 0.035)), texture=True, parts=parts or [],
        chip_region=_CENTRAL if parts else None, chip_radius=(7.0, 12.0),
    )


def _backdrop(rng: np.random.Generator, base: tuple[float, float, float]) -> np.ndarray:
    """A plain table / cloth behind an object: a jittered colour with faint low-frequency mottling."""
    colour = jitter_colour(rng, base, 0.025, tint=0.008)
    return colour * (1.0 + 0.03 * value_noise(rng, 40.0))[..., None]


def _render_weave(rng: np.random.Generator) -> _Scene:
    """Plain-woven fabric: over/under threads with random phase, slight turn and warp."""
    period = rng.uniform(7.0, 9.0)
    u, v = local_frame(rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(-0.15, 0.15))
    u = u + 1.5 * value_noise(rng, 30.0)
    v = v + 1.5 * value_noise(rng, 30.0)
    a, b = u / np.float32(period), v / np.float32(period)
    fa, fb = a - np.floor(a), b - np.floor(b)
    over = ((np.floor(a) + np.floor(b)) % 2) == 0
    profile_a = np.sqrt(np.sin(np.pi * fa))
    profile_b = np.sqrt(np.sin(np.pi * fb))
    shade = np.where(over, profile_a * (0.7 + 0.3 * np.sin(np.pi * fb)), profile_b * (0.7 + 0.3 * np.sin(np.pi * fa)))
    warp = jitter_colour(rng, (0.62, 0.55, 0.42), 0.05)
    weft = warp * rgb((0.92, 0.95, 1.02))
    thread = np.where(over[..., None], warp, weft)
    fibre = 1.0 + 0.06 * value_noise(rng, 2.0, smooth=False)
    albedo = (0.22 * thread + 0.78 * thread * shade[..., None]) * fibre[..., None]
    return _texture_scene(albedo)


def _render_tiles(rng: np.random.Generator) -> _Scene:
    """Square terrazzo tiles with grout lines; per-tile colour, random offset and slight turn."""
    period = rng.uniform(52.0, 58.0)
    u, v = local_frame(rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(-0.06, 0.06))
    a, b = u / np.float32(period), v / np.float32(period)
    ia, ib = np.floor(a).astype(np.int64) % 8, np.floor(b).astype(np.int64) % 8
    fa, fb = (a - np.floor(a)) * period, (b - np.floor(b)) * period
    edge = np.minimum(np.minimum(fa, period - fa), np.minimum(fb, period - fb))
    tile_cover = coverage_of(np.float32(2.5) - edge)
    base = jitter_colour(rng, (0.72, 0.70, 0.65), 0.04)
    per_tile = rng.normal(0.0, 0.035, (8, 8, 1)).astype(np.float32) + rng.normal(0.0, 0.01, (8, 8, 3)).astype(np.float32)
    tile = base + per_tile[ib, ia]
    chips = value_noise(rng, 3.0, smooth=False)
    tile = tile * (select(chips > 1.6, 0.75, 1.0) + select(chips < -1.7, 0.12, 0.0))[..., None]
    tile = tile * (1.0 + 0.03 * value_noise(rng, 12.0))[..., None]
    grout = jitter_colour(rng, (0.36, 0.35, 0.33), 0.02)
    albedo = paint(np.broadcast_to(grout, (SIZE, SIZE, 3)), tile, tile_cover)
    return _texture_scene(albedo)


def _render_grain(rng: np.random.Generator) -> _Scene:
    """Wood: growth rings bent by smooth noise, with fine streaks along the grain."""
    angle = rng.uniform(-0.2, 0.2)
    _, v = local_frame(rng.uniform(0, SIZE), rng.uniform(0, SIZE), angle)
    period = rng.uniform(9.0, 14.0)
    bend = 14.0 * value_noise(rng, 70.0, angle, stretch=2.5) + 4.0 * value_noise(rng, 25.0, angle, stretch=3.0)
    rings = 0.5 + 0.5 * np.sin((v + bend) * np.float32(2 * math.pi / period))
    light = jitter_colour(rng, (0.70, 0.50, 0.30), 0.04)
    dark = light * rgb((0.66, 0.60, 0.55))
    streak = value_noise(rng, 1.5, angle, stretch=12.0, smooth=False)
    albedo = paint(np.broadcast_to(light, (SIZE, SIZE, 3)), dark, rings**3) * (1.0 + 0.05 * streak)[..., None]
    return _texture_scene(albedo)


def _render_mesh(rng: np.random.Generator) -> _Scene:
    """Woven metal grid over a dark backing: round wires, over/under at the crossings."""
    period = rng.uniform(13.0, 16.0)
    half_width = rng.uniform(2.0, 2.6)
    u, v = local_frame(rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(-0.12, 0.12))
    u = u + 0.8 * value_noise(rng, 40.0)
    v = v + 0.8 * value_noise(rng, 40.0)
    a, b = u / np.float32(period), v / np.float32(period)
    du = np.abs(a - np.floor(a) - 0.5) * period          # distance to the nearest vertical wire
    dv = np.abs(b - np.floor(b) - 0.5) * period          # ... and horizontal wire
    cover_u, cover_v = coverage_of(du - half_width), coverage_of(dv - half_width)
    metal = jitter_colour(rng, (0.62, 0.62, 0.60), 0.04, tint=0.006)
    shade_u = 0.55 + 0.45 * np.sqrt(np.clip(1 - (du / half_width) ** 2, 0, 1))
    shade_v = 0.55 + 0.45 * np.sqrt(np.clip(1 - (dv / half_width) ** 2, 0, 1))
    backing = _backdrop(rng, (0.12, 0.12, 0.13))
    vertical_on_top = ((np.floor(a) + np.floor(b)) % 2 == 0)[..., None]
    wire_u, wire_v = metal * shade_u[..., None], metal * shade_v[..., None]
    under_first = paint(paint(backing, wire_v, cover_v), wire_u, cover_u)
    over_first = paint(paint(backing, wire_u, cover_u), wire_v, cover_v)
    albedo = np.where(vertical_on_top, under_first, over_first)
    return _texture_scene(albedo, background=backing, parts=[np.maximum(cover_u, cover_v)])


def _render_stripes(rng: np.random.Generator) -> _Scene:
    """Corduroy: soft parallel ribs with random phase and a slight turn, fibres along the ribs."""
    angle = rng.uniform(-0.12, 0.12)
    _, v = local_frame(rng.uniform(0, SIZE), rng.uniform(0, SIZE), angle)
    period = rng.uniform(5.5, 7.0)
    v = v + 1.2 * value_noise(rng, 50.0)
    rib = (0.5 + 0.5 * np.cos(v * np.float32(2 * math.pi / period))) ** 1.5
    colour = jitter_colour(rng, (0.22, 0.38, 0.44), 0.04)
    fibre = value_noise(rng, 1.5, angle, stretch=10.0, smooth=False)
    albedo = colour * (0.5 + 0.55 * rib + 0.05 * fibre)[..., None]
    return _texture_scene(albedo)


def _render_speckle(rng: np.random.Generator) -> _Scene:
    """Grained leather: mottled two-tone fractal noise with creases and pores."""
    tone = fbm(rng, 48.0, 3)
    light = jitter_colour(rng, (0.50, 0.33, 0.24), 0.04)
    dark = light * rgb((0.62, 0.58, 0.56))
    albedo = paint(np.broadcast_to(light, (SIZE, SIZE, 3)), dark, 1.0 / (1.0 + np.exp(-2.0 * tone)))
    creases = np.abs(value_noise(rng, 9.0))
    pores = value_noise(rng, 2.0, smooth=False)
    factor = 1.0 - 0.22 * np.clip(1.0 - creases / 0.12, 0, 1) - select(pores > 1.9, 0.18, 0.0)
    return _texture_scene(albedo * factor[..., None])


def _object_scene(albedo: np.ndarray, background: np.ndarray, cover: np.ndarray, **extra) -> _Scene:
    return _Scene(
        albedo=albedo, support=cover >= 0.999, background=background,
        hole_colour=background[::8, ::8].mean(axis=(0, 1)) * 0.4, texture=False, **extra,
    )


def _render_disc(rng: np.random.Generator) -> _Scene:
    """A turned metal flange: index notch, three bolt holes, raised hub, machining rings."""
    cx, cy = CENTRE + rng.uniform(-12, 12), CENTRE + rng.uniform(-12, 12)
    radius = rng.uniform(58.0, 64.0)
    u, v = local_frame(cx, cy, rng.uniform(0, 2 * math.pi))
    r = np.hypot(u, v)
    body = np.maximum(r - radius, -np.maximum(np.abs(v) - 5.0, (radius - 9.0) - u))   # disc minus notch
    for k in range(3):
        angle = math.pi / 3 + k * 2 * math.pi / 3
        hx, hy = 0.58 * radius * math.cos(angle), 0.58 * radius * math.sin(angle)
        body = np.maximum(body, 6.5 - np.hypot(u - hx, v - hy))
    cover = coverage_of(body)
    metal = jitter_colour(rng, (0.60, 0.61, 0.64), 0.04, tint=0.006)
    _, view_angle = local_frame(cx, cy, rng.uniform(0, 2 * math.pi))    # light direction, fixed to the camera
    sheen = 0.88 + 0.12 * view_angle / np.maximum(r, 1.0)
    rings = 1.0 + 0.05 * np.sin(r * np.float32(2 * math.pi / 3.1))
    bevel = select(radius - r < 4.0, 0.72, 1.0)
    hub = select(r < 0.3 * radius, 1.1, 1.0) * select(np.abs(r - 0.3 * radius) < 1.2, 0.7, 1.0)
    surface = metal * (sheen * rings * bevel * hub)[..., None]
    background = _backdrop(rng, (0.16, 0.17, 0.21))
    return _object_scene(paint(background, surface, cover), background, cover)


def _render_screw(rng: np.random.Generator) -> _Scene:
    """A machine screw lying in any orientation: slotted head, threaded shaft, tapered tip."""
    cx, cy = CENTRE + rng.uniform(-10, 10), CENTRE + rng.uniform(-10, 10)
    axis = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(136.0, 146.0)
    u, v = local_frame(cx, cy, axis)
    head_end, tip_start, tip_end = -length / 2 + 20.0, length / 2 - 16.0, length / 2
    pitch = 6.5
    phase = (u + 0.35 * v) / np.float32(pitch)
    tooth = 2.0 * np.abs(phase - np.floor(phase) - 0.5)                 # triangle wave in [0, 1]
    half_width = 9.0 + 2.2 * tooth
    taper = np.clip((tip_end - u) / (tip_end - tip_start), 0.0, 1.0)
    shaft = np.maximum(np.abs(v) - half_width * np.minimum(taper, 1.0), np.abs(u - (head_end + tip_end) / 2)
                       - (tip_end - head_end) / 2)
    head = box_sdf(u + length / 2 - 10.0, v, 10.0, 17.0, radius=3.0)
    cover = coverage_of(np.minimum(shaft, head))
    metal = jitter_colour(rng, (0.50, 0.50, 0.52), 0.05, tint=0.006)
    across = np.sqrt(np.clip(1 - (v / select(u < head_end, 17.0, half_width + 1.0)) ** 2, 0, 1))
    threads = select(u > head_end, 0.82 + 0.18 * np.sin(phase * np.float32(2 * math.pi)), 1.0)
    slot = select((u < head_end - 2) & (np.abs(v) < 2.5), 0.35, 1.0)
    surface = metal * ((0.45 + 0.55 * across) * threads * slot)[..., None]
    background = _backdrop(rng, (0.66, 0.66, 0.64))
    tip_x = cx + (tip_end - 4) * math.cos(axis)
    tip_y = cy + (tip_end - 4) * math.sin(axis)
    chip_region = np.hypot(PIXEL_X - tip_x, PIXEL_Y - tip_y) < 6.0
    return _object_scene(paint(background, surface, cover), background, cover, parts=[cover],
                         chip_region=chip_region, chip_radius=(12.0, 20.0), axis=axis)


def _render_nut(rng: np.random.Generator) -> _Scene:
    """A hex nut seen from above in any rotation: chamfered corners, threaded bore."""
    cx, cy = CENTRE + rng.uniform(-12, 12), CENTRE + rng.uniform(-12, 12)
    radius = rng.uniform(54.0, 60.0)
    angle = rng.uniform(0, 2 * math.pi)
    u, v = local_frame(cx, cy, angle)
    r = np.hypot(u, v)
    apothem = radius * math.cos(math.pi / 6)
    hexagon = np.maximum.reduce([np.abs(u * math.cos(k * math.pi / 3) + v * math.sin(k * math.pi / 3))
                                 for k in range(3)]) - apothem
    outline = np.maximum(np.maximum(hexagon, r - 0.96 * radius), 23.0 - r)
    cover = coverage_of(outline)
    metal = jitter_colour(rng, (0.56, 0.56, 0.55), 0.05, tint=0.006)
    chamfer = select(r > 0.86 * radius, 1.18, 1.0)
    thread = select(r < 28.0, 0.6 + 0.15 * np.sin(r * np.float32(2 * math.pi / 2.2)), 1.0)
    brushed = 1.0 + 0.05 * value_noise(rng, 2.0, rng.uniform(0, math.pi), stretch=8.0, smooth=False)
    surface = metal * (chamfer * thread * brushed)[..., None]
    background = _backdrop(rng, (0.08, 0.08, 0.09))
    corners = np.zeros((SIZE, SIZE), bool)
    for k in range(6):
        kx = cx + 0.96 * radius * math.cos(angle + k * math.pi / 3)
        ky = cy + 0.96 * radius * math.sin(angle + k * math.pi / 3)
        corners |= np.hypot(PIXEL_X - kx, PIXEL_Y - ky) < 4.0
    return _object_scene(paint(background, surface, cover), background, cover, parts=[cover],
                         chip_region=corners, chip_radius=(12.0, 18.0))


# PCB layout in board coordinates (u right, v down; the board is 196 x 156 around its centre)
_PCB_TRACES = [  # (u0, v0, u1, v1): axis-aligned copper tracks, 2.4 px wide
    (-48, -40, -48, -62), (-48, -62, 45, -62), (45, -62, 45, -53), (8, 18, 8, 45), (8, 45, 56, 45),
    (-20, 18, -20, 30), (-60, 30, -20, 30), (-60, 30, -60, 41), (-25, 41, -25, 30), (57, -45, 80, -45),
    (80, -45, 80, 50), (57, 15, 80, 15), (-88, -20, -48, -20), (33, -15, 10, -15),
]
_PCB_RESISTORS = [(45, -45), (45, -15), (45, 15), (45, 45)]    # centres; body 24 x 10, along u
_PCB_CAPACITORS = [(-60, 50), (-25, 50)]                        # centres; radius 9


def _render_pcb(rng: np.random.Generator) -> _Scene:
    """A small circuit board: IC with pins, resistors, capacitors, tracks, mounting holes."""
    cx, cy = CENTRE + rng.uniform(-8, 8), CENTRE + rng.uniform(-8, 8)
    angle = rng.uniform(-0.06, 0.06)
    c, s = math.cos(angle), math.sin(angle)
    u, v = local_frame(cx, cy, angle)

    def paint_box(image: np.ndarray, colour: np.ndarray, pu: float, pv: float, half_u: float, half_v: float,
                  radius: float = 0.0) -> np.ndarray:
        """Paint a board-aligned rounded box (centre pu, pv) inside its window only; returns its coverage."""
        win = box_window(cx + pu * c - pv * s, cy + pu * s + pv * c, half_u * abs(c) + half_v * abs(s),
                      half_u * abs(s) + half_v * abs(c))
        cover = np.zeros((SIZE, SIZE), np.float32)
        cover[win] = coverage_of(box_sdf(u[win] - pu, v[win] - pv, half_u, half_v, radius))
        image[win] = paint(image[win], colour, cover[win])
        return cover

    def disc_window(pu: float, pv: float, radius: float) -> tuple[tuple[slice, slice], np.ndarray]:
        win = box_window(cx + pu * c - pv * s, cy + pu * s + pv * c, radius, radius)
        return win, np.hypot(u[win] - pu, v[win] - pv)

    table = _backdrop(rng, (0.20, 0.20, 0.21))
    green = jitter_colour(rng, (0.10, 0.40, 0.20), 0.03)
    board = green * (1.0 + 0.05 * value_noise(rng, 6.0))[..., None]
    background = paint(table, board, coverage_of(box_sdf(u, v, 98.0, 78.0, radius=4.0)))
    copper = green * 0.6 + rgb((0.35, 0.30, 0.10))
    for u0, v0, u1, v1 in _PCB_TRACES:
        paint_box(background, copper, (u0 + u1) / 2, (v0 + v1) / 2, abs(u1 - u0) / 2 + 1.2, abs(v1 - v0) / 2 + 1.2)
    silver = jitter_colour(rng, (0.78, 0.78, 0.76), 0.02, tint=0.002)
    for hu, hv in ((-86, -66), (86, -66), (-86, 66), (86, 66)):
        win, d = disc_window(hu, hv, 7.0)
        background[win] = paint(paint(background[win], silver, coverage_of(d - 6.5)), rgb((0.05, 0.05, 0.05)),
                                 coverage_of(d - 3.5))
    for ru, rv in _PCB_RESISTORS:                                  # solder pads under each resistor
        for side in (-1, 1):
            paint_box(background, silver, ru + side * 12.0, rv, 4.0, 6.0)
    albedo = background.copy()
    for k in range(7):
        for side in (-1, 1):
            paint_box(albedo, silver, 9.0 * k - 43.0, side * 25.0 - 10.0, 2.2, 4.0)
    chip = paint_box(albedo, jitter_colour(rng, (0.08, 0.08, 0.09), 0.01), -20.0, -10.0, 30.0, 22.0, radius=1.5)
    win, d = disc_window(-42.0, -24.0, 3.0)
    albedo[win] = paint(albedo[win], rgb((0.5, 0.5, 0.5)), coverage_of(d - 3.0))                  # pin-1 dot
    parts = []
    body_colour = jitter_colour(rng, (0.70, 0.60, 0.42), 0.03)
    band_colour = rgb((0.45, 0.12, 0.08))
    for ru, rv in _PCB_RESISTORS:
        win = box_window(cx + ru * c - rv * s, cy + ru * s + rv * c, 13.0, 13.0)
        lu, lv = u[win] - ru, v[win] - rv
        body = np.zeros((SIZE, SIZE), np.float32)
        body[win] = coverage_of(box_sdf(lu, lv, 12.0, 5.0, radius=2.5))
        bands = (np.abs(lu + 5) < 1.5) | (np.abs(lu) < 1.5) | (np.abs(lu - 5) < 1.5)
        shade = 0.7 + 0.3 * np.sqrt(np.clip(1 - (lv / 5) ** 2, 0, 1))
        albedo[win] = paint(albedo[win], np.where(bands[..., None], band_colour, body_colour) * shade[..., None],
                             body[win])
        parts.append(body)
    can_colour = jitter_colour(rng, (0.12, 0.20, 0.50), 0.03)
    for pu, pv in _PCB_CAPACITORS:
        win, d = disc_window(pu, pv, 10.0)
        body = np.zeros((SIZE, SIZE), np.float32)
        body[win] = coverage_of(d - 9.0)
        stripe = np.abs(u[win] - pu + v[win] - pv) < 1.2
        can = np.where(stripe[..., None], rgb((0.80, 0.80, 0.80)), can_colour)
        albedo[win] = paint(albedo[win], can * (0.75 + 0.25 * np.clip(1 - d / 9, 0, 1))[..., None], body[win])
        parts.append(body)
    support = (box_sdf(u, v, 97.0, 77.0, radius=4.0) <= 0) & (chip < 0.001)
    return _Scene(albedo=albedo, support=support, background=background, hole_colour=rgb((0.05, 0.05, 0.05)),
                  texture=False, parts=parts)


def _render_cap(rng: np.random.Generator) -> _Scene:
    """A bottle cap from above in any rotation: knurled ring, printed logo and lettering."""
    cx, cy = CENTRE + rng.uniform(-12, 12), CENTRE + rng.uniform(-12, 12)
    outer = rng.uniform(62.0, 67.0)
    inner = outer - 15.0
    angle = rng.uniform(0, 2 * math.pi)
    u, v = local_frame(cx, cy, angle)
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    knurl = np.sin(phi * 48.0)
    cover = coverage_of(r - outer + select(knurl > 0, 1.5, 0.0))
    colour = jitter_colour(rng, (0.72, 0.14, 0.10), 0.05)
    ring_shade = select(r > inner, 0.8 + 0.25 * np.sin(np.clip((r - inner) / 15.0, 0, 1) * math.pi), 0.88)
    ridges = select(r > outer - 6.0, 0.85 + 0.15 * knurl, 1.0)
    groove = select(np.abs(r - inner) < 1.0, 0.6, 1.0)
    surface = colour * (ring_shade * ridges * groove)[..., None]
    ink = rgb((0.85, 0.82, 0.74))
    star = np.hypot(u, v) - (14.0 + 6.0 * np.cos(5 * phi))                # a five-pointed logo
    letters = (np.abs(r - 34.0) < 3.5) & (np.cos(phi * 22.0) > 0.2) & (np.sin(phi) < -0.3)
    surface = paint(surface, ink, np.maximum(coverage_of(star), letters.astype(np.float32)))
    background = _backdrop(rng, (0.55, 0.55, 0.50))
    ring_band = (np.abs(r - (inner + outer) / 2) < 3.0)
    return _object_scene(paint(background, surface, cover), background, cover, parts=[cover],
                         chip_region=ring_band, chip_radius=(10.0, 15.0))


def _render_capsule(rng: np.random.Generator) -> _Scene:
    """A two-colour gelatin capsule with an imprint, either way round, slightly turned."""
    cx, cy = CENTRE + rng.uniform(-10, 10), CENTRE + rng.uniform(-10, 10)
    axis = rng.uniform(-0.35, 0.35) + math.pi * int(rng.integers(2))
    length, width = rng.uniform(146.0, 154.0), rng.uniform(56.0, 60.0)
    u, v = local_frame(cx, cy, axis)
    half_core = (length - width) / 2
    sdf = np.hypot(u - np.clip(u, -half_core, half_core), v) - width / 2
    cover = coverage_of(sdf)
    orange = jitter_colour(rng, (0.80, 0.42, 0.10), 0.04)
    white = jitter_colour(rng, (0.76, 0.76, 0.73), 0.03)
    body = np.where((u < 0)[..., None], orange, white)
    across = np.clip(1 - (v / (width / 2)) ** 2, 0, 1)
    shade = 0.62 + 0.3 * np.sqrt(across) + 0.12 * np.exp(-(((v + width / 4) / 4.0) ** 2))
    seam = select(np.abs(u) < 1.2, 0.6, 1.0)
    surface = body * (shade * seam)[..., None]
    imprint = (np.abs(v) < 7.0) & (((np.abs(u - 28) < 2.0) | ((np.abs(u - 40) < 2.0))) | (np.abs(v - 5) < 2.0)
                                   & (u > 28) & (u < 47))
    surface = paint(surface, rgb((0.25, 0.22, 0.22)), imprint.astype(np.float32))
    background = _backdrop(rng, (0.12, 0.12, 0.14))
    return _object_scene(paint(background, surface, cover), background, cover, axis=axis)


_RENDERERS: dict[str, Callable[[np.random.Generator], _Scene]] = {
    "weave": _render_weave, "disc": _render_disc, "tiles": _render_tiles, "nut": _render_nut,
    "grain": _render_grain, "pcb": _render_pcb, "mesh": _render_mesh, "capsule": _render_capsule,
    "stripes": _render_stripes, "cap": _render_cap, "speckle": _render_speckle, "screw": _render_screw,
}


# ----------------------------------------------------------------------------------------------
# Defects: each returns the changed albedo and the exact region it changed


def _anchor(rng: np.random.Generator, scene: _Scene) -> tuple[float, float]:
    """A defect centre: the central area of a texture, or inside the part away from its edge."""
    if scene.texture:
        return pick_point(rng, _CENTRAL)
    inner = ndimage.binary_erosion(scene.support, iterations=6)
    return pick_point(rng, inner if inner.any() else scene.support)


def _scratch(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _anchor(rng, scene)
    length = rng.uniform(35.0, 80.0)
    angle = rng.uniform(0, math.pi) if scene.axis is None else scene.axis + rng.normal(0.0, 0.25)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = np.array([cx, cy])
    control = np.stack([centre - direction * length / 2, centre + normal * rng.uniform(-0.3, 0.3) * length,
                        centre + direction * length / 2])
    half_width = rng.uniform(1.0, 1.8)
    mask = (polyline_distance(bezier(control), half_width + 2) <= half_width) & scene.support
    if rng.random() < 0.6:
        target = scene.albedo * 0.35 + 0.6        # bright: bare metal / crushed fibres
    else:
        target = scene.albedo * 0.3               # dark: a groove
    return np.where(mask[..., None], target, scene.albedo), mask


def _crack(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _anchor(rng, scene)
    heading = rng.uniform(0, 2 * math.pi)
    points = [np.array([cx, cy])]
    for _ in range(int(rng.integers(12, 20))):
        heading += rng.normal(0.0, 0.45)
        points.append(points[-1] + rng.uniform(2.5, 4.5) * np.array([math.cos(heading), math.sin(heading)]))
    main = np.stack(points)
    start = main[int(rng.integers(2, len(main) - 2))]
    heading = rng.uniform(0, 2 * math.pi)
    branch = [start]
    for _ in range(int(rng.integers(4, 8))):
        heading += rng.normal(0.0, 0.5)
        branch.append(branch[-1] + rng.uniform(2.5, 4.0) * np.array([math.cos(heading), math.sin(heading)]))
    half_width = rng.uniform(0.9, 1.4)
    distance = np.minimum(polyline_distance(main, half_width + 2), polyline_distance(np.stack(branch), half_width + 2))
    mask = (distance <= half_width) & scene.support
    return np.where(mask[..., None], scene.albedo * rng.uniform(0.12, 0.3), scene.albedo), mask


def _hole(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _anchor(rng, scene)
    sdf = blob_sdf(rng, cx, cy, rng.uniform(5.0, 10.0), 0.25)
    mask = (sdf <= 0) & scene.support
    frayed = scene.albedo * 0.5 + 0.35                       # torn fibres around the rim
    inside = np.where((sdf > -1.8)[..., None], frayed, scene.hole_colour)
    return np.where(mask[..., None], inside, scene.albedo), mask


_STAIN_COLOURS = np.array([(0.30, 0.18, 0.06), (0.62, 0.55, 0.10), (0.08, 0.08, 0.10), (0.15, 0.25, 0.60),
                           (0.80, 0.78, 0.70)], np.float32)


def _contrasting(rng: np.random.Generator, palette: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A random palette colour far enough from `reference` (3,) to be seen; the farthest otherwise."""
    order = rng.permutation(len(palette))
    distance = np.abs(palette[order] - reference).sum(axis=1)
    far = np.flatnonzero(distance > 0.6)
    return palette[order[far[0]] if far.size else order[int(np.argmax(distance))]]


def _stain(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _anchor(rng, scene)
    radius = rng.uniform(8.0, 16.0)
    sdf = blob_sdf(rng, cx, cy, radius, 0.35)
    mask = (sdf <= 0) & scene.support
    if not mask.any():
        return scene.albedo, mask
    colour = _contrasting(rng, _STAIN_COLOURS, scene.albedo[mask].mean(axis=0))
    alpha = np.clip(0.55 + 0.12 * value_noise(rng, 6.0) + select(sdf > -2.0, 0.2, 0.0), 0.4, 0.9)   # darker rim
    return np.where(mask[..., None], paint(scene.albedo, colour, alpha), scene.albedo), mask


_FOREIGN_COLOURS = np.array([(0.75, 0.12, 0.10), (0.10, 0.20, 0.70), (0.05, 0.05, 0.05), (0.85, 0.85, 0.80),
                             (0.15, 0.55, 0.15)], np.float32)


def _extra(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _anchor(rng, scene)
    if scene.texture:                                        # a stray fibre lying on the surface
        control = np.array([cx, cy]) + rng.uniform(-35.0, 35.0, (4, 2))
        half_width = rng.uniform(1.0, 1.6)
        mask = polyline_distance(bezier(control), half_width + 2) <= half_width
        colour = _contrasting(rng, _FOREIGN_COLOURS, scene.albedo[mask].mean(axis=0))
        return np.where(mask[..., None], colour, scene.albedo), mask
    radius = rng.uniform(4.0, 8.0)                           # a metal chip / burr / solder blob
    sdf = blob_sdf(rng, cx, cy, radius, 0.3)
    mask = sdf <= 0
    colour = _contrasting(rng, _FOREIGN_COLOURS[[0, 2, 3]], scene.albedo[mask].mean(axis=0))
    highlight = 0.75 + 0.35 * np.clip(-((PIXEL_X - cx) + (PIXEL_Y - cy)) / (2 * radius), -1, 1)
    return np.where(mask[..., None], colour * highlight[..., None], scene.albedo), mask


def _missing(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    if scene.chip_region is None:                            # a whole component is gone
        part = scene.parts[int(rng.integers(len(scene.parts)))]
        mask = part > 0
    else:                                                    # a piece broke off
        cx, cy = pick_point(rng, scene.chip_region)
        sdf = blob_sdf(rng, cx, cy, rng.uniform(*scene.chip_radius), 0.3)
        mask = (sdf <= 0) & (scene.parts[0] > 0)
    return np.where(mask[..., None], scene.background, scene.albedo), mask


_DEFECT_PAINTERS: dict[str, Callable[[np.random.Generator, _Scene], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack, "missing": _missing, "extra": _extra,
}


# ----------------------------------------------------------------------------------------------
# One sample


def _seed_sequence(seed: int, class_name: str, split: str, defect: str, index: int) -> np.random.SeedSequence:
    key = [seed, zlib.crc32(class_name.encode()), zlib.crc32(split.encode()), zlib.crc32(defect.encode()), index]
    return np.random.SeedSequence(key)


def render_sample(class_name: str, split: str, defect: str, index: int, seed: int = 0,
                  with_defect: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one image of the dataset, exactly as `generate` writes it.

    Parameters: class_name: one of CLASS_ORDER; split: "train" or "test"; defect: "good" or one of
    the class's DEFECTS; index: the image number; seed: the dataset seed; with_defect: False renders
    the same anomalous sample without its defect (same pose, lighting and noise), to compare.
    Returns: the image (H, W, 3) uint8 RGB and, for a drawn defect, its mask (H, W) bool, else None.
    """
    if class_name not in _RENDERERS:
        raise DatasetError(f"synth: unknown class {class_name!r}; known classes: {', '.join(CLASS_ORDER)}")
    if defect != "good" and (split != "test" or defect not in DEFECTS[class_name]):
        raise DatasetError(f"synth: class {class_name!r} has no {split}/{defect} images; "
                           f"its defects are {', '.join(DEFECTS[class_name])} (test split only)")
    scene_seq, defect_seq = _seed_sequence(seed, class_name, split, defect, index).spawn(2)
    rng = np.random.default_rng(scene_seq)
    scene = _RENDERERS[class_name](rng)
    # lighting: overall level, a linear gradient in a random direction, and a colour cast
    direction = rng.uniform(0, 2 * math.pi)
    slope = rng.uniform(0.0, 0.22)
    gradient = (UNIT_X * np.float32(slope * math.cos(direction)) + UNIT_Y * np.float32(slope * math.sin(direction))) + 1.0
    cast = (1.0 + rng.normal(0.0, 0.025, 3).astype(np.float32)) * np.float32(rng.uniform(0.85, 1.12) * 255.0)
    noise = NOISE_TABLE[np.frombuffer(rng.bytes(SIZE * SIZE * 3), np.uint8).reshape(SIZE, SIZE, 3)]
    albedo, mask = scene.albedo, None
    if defect != "good" and with_defect:
        defect_rng = np.random.default_rng(defect_seq)
        for _ in range(100):
            albedo, mask = _DEFECT_PAINTERS[defect](defect_rng, scene)
            if mask.sum() >= MIN_DEFECT_PIXELS:
                break
        else:
            raise AssertionError(f"synth: no visible {defect} on {class_name} test image {index}")
        # float32 like the clean albedo, so that pixels outside the mask round exactly as without the defect
        albedo = albedo.astype(np.float32, copy=False)
    exposure = albedo * gradient[..., None]
    exposure *= cast
    exposure += noise
    image = np.clip(np.rint(exposure, out=exposure), 0, 255, out=exposure).astype(np.uint8)
    return image, mask
