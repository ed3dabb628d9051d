"""DRAEM's simulated anomalies: Perlin-noise masks filled with augmented textures (data_loader.py, perlin.py).

Every draw comes from an explicit `numpy.random.Generator`, so one seed gives one sequence of
training samples. Images here are float tensors in [0, 1] in the network's channel order (BGR,
as the official cv2 pipeline); textures are uint8 (S, S, 3) arrays in the same order.

Official recipe (VitjanZ/DRAEM 2dbf673, notes/baselines.md section 1 and traps 3-4), per sample:
1. with p = 0.3 the normal image (the reconstruction target too) is rotated by U(-90, 90) degrees;
2. a texture is drawn uniformly from the anomaly source and 3 of the 10 augmenters below are
   applied in sequence (drawn without replacement);
3. a Perlin noise with scale 2^k per axis, k ∈ {0, …, 5}, is rotated by U(-90, 90) degrees and
   thresholded at 0.5 into a binary mask M;
4. β ~ U(0, 0.8): inside M the input is (1 − β)·texture + β·image, outside it is the image;
5. with p = 0.5 the sample stays clean (input = image, M = 0).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

# ----------------------------------------------------------------------------- Perlin noise


def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade 6t⁵ − 15t⁴ + 10t³."""
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def rand_perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Single-octave 2-D Perlin noise, the algorithm of the official `rand_perlin_2d_np` (perlin.py L46-65).

    A lattice of (res[0] + 1) × (res[1] + 1) random unit gradients (angles ~ U(0, 2π) from `rng`);
    each pixel blends the dot products with its cell's four corner gradients by the fade curve, times √2.
    The noise is 0 on the lattice points (rows multiple of shape[0]/res[0], columns of shape[1]/res[1]).
    Parameters: shape: (H, W), each divisible by the matching `res`; res: gradient cells per axis.
    Returns: (H, W) float64 in [−1, 1].
    """
    height, width = shape
    if height % res[0] or width % res[1]:
        raise ValueError(f"Perlin noise of shape {shape} needs sides divisible by the scale {res}")
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1).astype(np.float32)  # (r0 + 1, r1 + 1, 2)
    rows = np.arange(height) * (res[0] / height)  # lattice coordinate of each row
    cols = np.arange(width) * (res[1] / width)
    cell_r, cell_c = rows.astype(int), cols.astype(int)
    frac_r = (rows - cell_r).astype(np.float32)[:, None]  # (H, 1) position inside the cell
    frac_c = (cols - cell_c).astype(np.float32)[None, :]  # (1, W)

    def corner(dr: int, dc: int) -> np.ndarray:
        g = gradients[cell_r + dr][:, cell_c + dc]  # (H, W, 2) the gradient of that corner
        return (frac_r - dr) * g[..., 0] + (frac_c - dc) * g[..., 1]  # (H, W)

    t_r, t_c = fade(frac_r), fade(frac_c)
    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    top = n00 + t_r * (n10 - n00)
    bottom = n01 + t_r * (n11 - n01)
    return (math.sqrt(2) * (top + t_c * (bottom - top))).astype(np.float64)


# ----------------------------------------------------------------------------- rotation


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image about its centre, bilinear, zero fill outside (imgaug `Affine(rotate=...)`'s defaults).

    Parameters: images: (B, C, H, W) float; degrees: (B,) angles. Returns: (B, C, H, W).
    """
    height, width = images.shape[-2:]
    radians = degrees.to(images.dtype) * (math.pi / 180)
    cos, sin = torch.cos(radians).view(-1, 1, 1), torch.sin(radians).view(-1, 1, 1)  # (B, 1, 1)
    # pixel centres in [-1, 1] (align_corners=False); built directly, F.affine_grid is slow on the CPU
    xs = ((2 * torch.arange(width, dtype=images.dtype) + 1) / width - 1).view(1, 1, -1).to(images.device)
    ys = ((2 * torch.arange(height, dtype=images.dtype) + 1) / height - 1).view(1, -1, 1).to(images.device)
    grid = torch.stack((cos * xs - sin * ys, sin * xs + cos * ys), dim=-1)  # (B, H, W, 2) source (x, y) per output pixel
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------- texture augmenters
# Each takes a uint8 (S, S, 3) array (treated as RGB, as imgaug does, although DRAEM hands it BGR) and the
# generator, and returns a new uint8 array. Ranges are the official iaa arguments (data_loader.py L80-90).


def _pil(image: np.ndarray, mode: str = "RGB") -> Image.Image:
    """A uint8 (H, W, 3) array as a PIL image whose three bands are read in `mode` (RGB, YCbCr or HSV)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return Image.frombytes(mode, (image.shape[1], image.shape[0]), image.tobytes())


def gamma_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.GammaContrast((0.5, 2.0), per_channel=True): 255·(x/255)^γ with one γ per channel."""
    gammas = rng.uniform(0.5, 2.0, size=3)
    levels = np.arange(256) / 255.0
    tables = np.clip(np.round(255.0 * levels[None, :] ** gammas[:, None]), 0, 255).astype(np.uint8)  # (3, 256)
    return np.stack([tables[c][image[..., c]] for c in range(3)], axis=-1)


def multiply_and_add_to_brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)): on the luma (Y of YCbCr), in random order."""
    ycbcr = np.asarray(_pil(image).convert("YCbCr")).astype(np.float64)
    multiply, add = rng.uniform(0.8, 1.2), float(rng.integers(-30, 31))
    luma = ycbcr[..., 0]
    luma = luma * multiply + add if rng.random() < 0.5 else (luma + add) * multiply
    ycbcr[..., 0] = np.clip(np.round(luma), 0, 255)
    return np.asarray(_pil(ycbcr.astype(np.uint8), "YCbCr").convert("RGB"))


def enhance_sharpness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.pillike.EnhanceSharpness(): PIL's sharpness with factor ~ U(0, 2)."""
    return np.asarray(ImageEnhance.Sharpness(_pil(image)).enhance(rng.uniform(0.0, 2.0)))


def add_to_hue_and_saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.AddToHueAndSaturation((-50, 50), per_channel=True): separate integer shifts of hue (cyclic) and saturation (clipped).

    On PIL's HSV (all channels 0-255, so a hue shift v turns by v/255 of the circle, as imgaug's 255-scaled hue).
    """
    hsv = np.asarray(_pil(image).convert("HSV")).astype(np.int64)
    hue, saturation = rng.integers(-50, 51, size=2)
    hsv[..., 0] = (hsv[..., 0] + hue) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + saturation, 0, 255)
    return np.asarray(_pil(hsv.astype(np.uint8), "HSV").convert("RGB"))


def solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.Solarize(0.5, threshold=(32, 128)): with p = 0.5 invert every value ≥ a threshold ~ U{32..128}."""
    apply, threshold = rng.random() < 0.5, int(rng.integers(32, 129))
    return np.asarray(ImageOps.solarize(_pil(image), threshold)) if apply else image.copy()


def posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.Posterize() (nb_bits (1, 8)): keep the top k ~ U{1..8} bits of every value (PIL's posterize)."""
    return np.asarray(ImageOps.posterize(_pil(image), int(rng.integers(1, 9))))


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.Invert() (p = 1): 255 − x."""
    return 255 - image


def autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.pillike.Autocontrast() (cutoff (0, 20)): PIL's autocontrast cutting c ~ U{0..20} % at each end."""
    return np.asarray(ImageOps.autocontrast(_pil(image), cutoff=int(rng.integers(0, 21))))


def equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.pillike.Equalize(): PIL's histogram equalisation."""
    return np.asarray(ImageOps.equalize(_pil(image)))


def affine_rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """iaa.Affine(rotate=(-45, 45)): rotation about the centre, bilinear, zero fill."""
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, 3, S, S)
    turned = rotate(tensor, torch.tensor([rng.uniform(-45.0, 45.0)]))[0]
    return turned.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


TEXTURE_AUGMENTERS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    gamma_contrast, multiply_and_add_to_brightness, enhance_sharpness, add_to_hue_and_saturation, solarize,
    posterize, invert, autocontrast, equalize, affine_rotate,
)  # the official list, in its order (data_loader.py L80-90)


def augment_texture(texture: np.ndarray, rng: np.random.Generator, count: int = 3) -> np.ndarray:
    """Apply `count` distinct augmenters drawn without replacement, in the drawn order (`randAugmenter`)."""
    for index in rng.choice(len(TEXTURE_AUGMENTERS), size=count, replace=False):
        texture = TEXTURE_AUGMENTERS[index](texture, rng)
    return texture


# ----------------------------------------------------------------------------- simulated anomalies


@dataclass(frozen=True)
class AugmentSettings:
    """The knobs of the simulation; defaults are the official values (data_loader.py)."""

    max_scale_exponent: int = 5  # Perlin scale 2^k, k ~ U{0..5} per axis (randint(0, 6), L109-111)
    threshold: float = 0.5  # the rotated noise is thresholded here into the mask (L116)
    max_beta: float = 0.8  # β ~ U(0, max_beta): the image's weight inside the mask (L124)
    clean_probability: float = 0.5  # samples left clean (L131)
    rotate_probability: float = 0.3  # normal image rotated by U(-90, 90) (L148)
    texture_augmenters: int = 3  # distinct augmenters applied to each texture (L100)


@dataclass
class SyntheticBatch:
    """What one training step sees."""

    target: Tensor  # (B, 3, S, S) the (possibly rotated) normal image: the reconstruction target
    augmented: Tensor  # (B, 3, S, S) the input with the simulated anomaly
    mask: Tensor  # (B, 1, S, S) float 0/1, 1 = simulated anomaly
    clean: Tensor  # (B,) bool, True = the sample was left clean on purpose


class TextureSource(abc.ABC):
    """Anomaly source textures: `len()` textures, `texture(i)` a uint8 (S, S, 3) array in the network's channel order.

    Implemented by `textures.FolderTextures` (DTD, the official source) and `textures.GeneratedTextures` (offline).
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of textures."""

    @abc.abstractmethod
    def texture(self, index: int) -> np.ndarray:
        """Texture `index` as a uint8 (S, S, 3) array."""


def perlin_mask_noise(size: int, rng: np.random.Generator, max_exponent: int) -> np.ndarray:
    """One (size, size) Perlin noise with scales 2^k_x, 2^k_y, k ~ U{0..max_exponent} each."""
    scales = 2 ** rng.integers(0, max_exponent + 1, size=2)
    return rand_perlin_2d((size, size), (int(scales[0]), int(scales[1])), rng)


def synthesize(images: Tensor, source: TextureSource, rng: np.random.Generator,
               settings: AugmentSettings = AugmentSettings()) -> SyntheticBatch:
    """Simulated anomalies for a batch of normal images (the recipe in the module docstring).

    Parameters: images: (B, 3, S, S) float in [0, 1], network channel order; source: the textures
    (size S); rng: the generator of every draw. Returns: a `SyntheticBatch` on the images' device.
    """
    batch, _, size, _ = images.shape
    device, dtype = images.device, images.dtype
    rotate_image = torch.from_numpy(rng.random(batch) < settings.rotate_probability)
    image_angles = torch.from_numpy(rng.uniform(-90.0, 90.0, size=batch)).float()
    target = images.clone()
    if bool(rotate_image.any()):
        target[rotate_image.to(device)] = rotate(images[rotate_image.to(device)], image_angles[rotate_image].to(device))

    noises, textures, betas, clean = [], [], [], []
    for _ in range(batch):
        noises.append(perlin_mask_noise(size, rng, settings.max_scale_exponent))
        betas.append(rng.uniform(0.0, settings.max_beta))
        clean.append(bool(rng.random() < settings.clean_probability))
        if clean[-1]:  # the texture of a clean sample is never seen: skip the reading and augmenting
            textures.append(np.zeros((size, size, 3), dtype=np.uint8))
            continue
        texture = source.texture(int(rng.integers(len(source))))
        textures.append(augment_texture(texture, rng, settings.texture_augmenters))
    noise_angles = torch.from_numpy(rng.uniform(-90.0, 90.0, size=batch)).float()
    noise = torch.from_numpy(np.stack(noises)).float()[:, None]  # (B, 1, S, S)
    mask = (rotate(noise, noise_angles) > settings.threshold).to(device, dtype)  # rotated, then thresholded
    clean_flags = torch.tensor(clean)
    mask[clean_flags.to(device)] = 0.0
    texture = torch.from_numpy(np.stack(textures)).permute(0, 3, 1, 2).to(device, dtype) / 255.0  # (B, 3, S, S)
    beta = torch.tensor(betas, dtype=dtype, device=device).view(-1, 1, 1, 1)
    augmented = target * (1 - mask) + mask * ((1 - beta) * texture + beta * target)
    return SyntheticBatch(target=target, augmented=augmented, mask=mask, clean=clean_flags)
