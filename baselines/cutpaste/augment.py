"""Cut & Paste's self-supervised augmentations in torch: colour jitter, CutPaste and CutPaste-Scar.

Follows Runinho/pytorch-cutpaste `10d8bf7` (cutpaste.py; notes/baselines.md section 2): a
rectangle of 2-15 % of the image area with a log-uniform aspect ratio in [0.3, 1/0.3] is cut from
the image itself, colour-jittered and pasted at a uniformly drawn place (CutPaste); a thin
rectangle (2-16 x 10-25 pixels) is cut, jittered, rotated by -45..45 degrees with the canvas
expanded and pasted through its rotated outline (Scar). Every draw comes from the generator
passed in, so a pass of training is reproducible from its seed.
Images are (3, H, W) float RGB in [0, 1]; every function returns a new tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# cutpaste.py CutPasteNormal: area_ratio=[0.02, 0.15], aspect_ratio=0.3 (log-uniform in [0.3, 1/0.3])
AREA_RATIO = (0.02, 0.15)
ASPECT_RATIO = 0.3
# cutpaste.py CutPasteScar: width=[2, 16], height=[10, 25], rotation=[-45, 45] (pixels of a 256 image, degrees)
SCAR_WIDTH = (2.0, 16.0)
SCAR_HEIGHT = (10.0, 25.0)
SCAR_ROTATION = (-45.0, 45.0)
JITTER = 0.1  # run_training.py L57 and cutpaste.py L15-24: ColorJitter(0.1, 0.1, 0.1, 0.1)
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _grey(image: Tensor) -> Tensor:
    """(1, H, W) luma of a (3, H, W) image."""
    r, g, b = image
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(0)


def _rgb_to_hsv(image: Tensor) -> Tensor:
    """(3, H, W) RGB in [0, 1] to HSV in [0, 1] (torchvision's formulas)."""
    r, g, b = image
    maxc, minc = image.max(0).values, image.min(0).values
    equal = maxc == minc
    spread = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = spread / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, spread)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hue = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
           + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return torch.stack([torch.remainder(hue / 6.0 + 1.0, 1.0), saturation, maxc])


def _hsv_to_rgb(image: Tensor) -> Tensor:
    """(3, H, W) HSV in [0, 1] to RGB (torchvision's formulas)."""
    h, s, v = image
    sector = torch.floor(h * 6.0)
    fraction = h * 6.0 - sector
    sector = sector.long() % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * fraction)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - fraction))).clamp(0.0, 1.0)
    table = torch.stack([torch.stack(c) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table.gather(0, sector.expand(1, 3, *sector.shape)).squeeze(0)  # (3, H, W)


def color_jitter(image: Tensor, generator: torch.Generator, strength: float = JITTER) -> Tensor:
    """torchvision's ColorJitter(strength, strength, strength, strength) on one image.

    Brightness, contrast and saturation factors are drawn from U(1 - s, 1 + s), the hue shift from
    U(-s, s), and the four are applied in a random order, each result clamped to [0, 1].
    Parameters: image: (3, H, W) in [0, 1]. Returns: (3, H, W) in [0, 1].
    """
    if strength == 0:
        return image.clone()
    factors = [_uniform(1 - strength, 1 + strength, generator) for _ in range(3)]
    shift = _uniform(-strength, strength, generator)
    for operation in torch.randperm(4, generator=generator).tolist():
        if operation == 0:
            image = (image * factors[0]).clamp(0.0, 1.0)
        elif operation == 1:
            image = (factors[1] * image + (1 - factors[1]) * _grey(image).mean()).clamp(0.0, 1.0)
        elif operation == 2:
            image = (factors[2] * image + (1 - factors[2]) * _grey(image)).clamp(0.0, 1.0)
        else:
            hsv = _rgb_to_hsv(image)
            hsv[0] = torch.remainder(hsv[0] + shift, 1.0)
            image = _hsv_to_rgb(hsv)
    return image


@dataclass(frozen=True)
class Pasted:
    """An augmented image and where it differs from the source by construction."""

    image: Tensor  # (3, H, W) in [0, 1]
    mask: Tensor   # (H, W) bool, True where a pasted pixel was written


def _paste(image: Tensor, patch: Tensor, outline: Tensor, top: int, left: int) -> Pasted:
    """Write `patch` (3, h, w) into a copy of `image` at (top, left), only where `outline` (h, w) is True."""
    out = image.clone()
    h, w = outline.shape
    region = out[:, top:top + h, left:left + w]
    out[:, top:top + h, left:left + w] = torch.where(outline, patch, region)
    mask = torch.zeros(image.shape[1:], dtype=torch.bool)
    mask[top:top + h, left:left + w] = outline
    return Pasted(out, mask)


def cutpaste(image: Tensor, generator: torch.Generator, jitter: float = JITTER) -> Pasted:
    """CutPaste (Li et al., CVPR 2021, Sec. 3.1) as cutpaste.py CutPasteNormal.

    Parameters: image: (3, H, W) in [0, 1]; generator: the source of every draw; jitter: the
    patch's ColorJitter strength. Returns: the image with a jittered copy of one of its rectangles.
    """
    _, height, width = image.shape
    area = _uniform(*AREA_RATIO, generator) * height * width
    aspect = math.exp(_uniform(math.log(ASPECT_RATIO), math.log(1 / ASPECT_RATIO), generator))
    cut_w = min(width, round(math.sqrt(area * aspect)))
    cut_h = min(height, round(math.sqrt(area / aspect)))
    top, left = int(_uniform(0, height - cut_h, generator)), int(_uniform(0, width - cut_w, generator))
    patch = color_jitter(image[:, top:top + cut_h, left:left + cut_w], generator, jitter)
    to_top, to_left = int(_uniform(0, height - cut_h, generator)), int(_uniform(0, width - cut_w, generator))
    return _paste(image, patch, torch.ones(cut_h, cut_w, dtype=torch.bool), to_top, to_left)


def rotate_expanded(patch: Tensor, degrees: float) -> tuple[Tensor, Tensor]:
    """Rotate a patch counter-clockwise on a canvas that holds all of it (PIL `rotate(expand=True)`, nearest).

    Parameters: patch: (3, h, w). Returns: (rotated (3, H', W'), outline (H', W') bool: inside the
    rotated rectangle).
    """
    _, h, w = patch.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    out_w = max(1, math.ceil(abs(w * cos) + abs(h * sin) - 1e-6))
    out_h = max(1, math.ceil(abs(w * sin) + abs(h * cos) - 1e-6))
    ys, xs = torch.meshgrid(torch.arange(out_h, dtype=torch.float64) + 0.5 - out_h / 2,
                            torch.arange(out_w, dtype=torch.float64) + 0.5 - out_w / 2, indexing="ij")
    # inverse map of a counter-clockwise rotation in image coordinates (y down)
    source_x = cos * xs - sin * ys + w / 2
    source_y = sin * xs + cos * ys + h / 2
    col, row = torch.floor(source_x).long(), torch.floor(source_y).long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    rotated = patch[:, row.clamp(0, h - 1), col.clamp(0, w - 1)] * inside
    return rotated, inside


def scar(image: Tensor, generator: torch.Generator, jitter: float = JITTER) -> Pasted:
    """CutPaste-Scar (Sec. 3.1) as cutpaste.py CutPasteScar: a thin jittered, rotated strip of the image.

    Parameters: as `cutpaste`. Returns: the image with the strip pasted through its rotated outline.
    """
    _, height, width = image.shape
    cut_w = min(width, max(1, round(_uniform(*SCAR_WIDTH, generator))))
    cut_h = min(height, max(1, round(_uniform(*SCAR_HEIGHT, generator))))
    top, left = int(_uniform(0, height - cut_h, generator)), int(_uniform(0, width - cut_w, generator))
    patch = color_jitter(image[:, top:top + cut_h, left:left + cut_w], generator, jitter)
    rotated, outline = rotate_expanded(patch, _uniform(*SCAR_ROTATION, generator))
    outline = outline[:height, :width]  # a strip wider than a tiny image is cut at its border
    rotated = rotated[:, :height, :width]
    to_top = int(_uniform(0, height - outline.shape[0], generator))
    to_left = int(_uniform(0, width - outline.shape[1], generator))
    return _paste(image, rotated, outline, to_top, to_left)
