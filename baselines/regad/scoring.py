"""RegAD's test-time scoring: support augmentation, a Gaussian per position, the Mahalanobis map, the blur.

Official code: MediaBrain-SJTU/RegAD `5e2c1f8`, test.py L100-213 and utils/funcs.py L8-66
(`/work/shared/notes/baselines.md` section 4). Everything here is pure torch on tensors.

The Gaussian at each position p is fitted to the N augmented support embeddings x_1..x_N ∈ R^C:
mean μ_p and Σ_p = cov(x) (unbiased) + ε·I with ε = 0.01. The official code stores all P = 3136
matrices Σ_p (448 × 448: 2.5 GB in float32) and inverts each one. With N = 44 samples, Σ_p is
ε·I plus a rank < N term, so the same distance follows exactly from the Woodbury identity: with
A_p = (x_i − μ_p)_i / √(N − 1) (N × C, so cov = AᵀA) and L L ᵀ = ε·I_N + A Aᵀ (Cholesky, N × N),
    Σ_p⁻¹ = (I − Aᵀ (ε·I_N + A Aᵀ)⁻¹ A) / ε,   d_p(e)² = (‖δ‖² − ‖W δ‖²) / ε,   W = L⁻¹ A,  δ = e − μ_p.
W holds N × C numbers per position (190 MB per Gaussian for C = 176, 490 MB for C = 448, in float64)
instead of C × C. The difference of two close squared norms loses digits, so W and the distances
are computed in float64. (A batched Cholesky and triangular solve are fast; a batched SVD or eigh of the same
sizes was 5-10x slower on a CPU.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from baselines.regad.model import warp
from ltbench.errors import DetectorError

# test.py L106-110: small rotations, in radians
SUPPORT_ROTATIONS = tuple(k * math.pi / 16 for k in (-4, -3, -2, -1, 1, 2, 3, 4))
# test.py L113-115: translations in normalised [-1, 1] coordinates (0.2 = a tenth of the image side)
SUPPORT_TRANSLATIONS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2),
                        (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # kornia `rgb_to_grayscale`'s default weights (funcs.py L62-65)
AUGMENTATIONS_PER_IMAGE = 1 + len(SUPPORT_ROTATIONS) + len(SUPPORT_TRANSLATIONS) + 1 + 1 + 3  # 22
POSITION_CHUNK = 512  # positions per step of the Mahalanobis map (bounds the memory of δ)


def _affine(images: Tensor, matrix: Sequence[Sequence[float]]) -> Tensor:
    theta = torch.tensor(matrix, dtype=images.dtype, device=images.device).expand(len(images), 2, 3)
    return warp(images, theta)  # affine_grid + grid_sample, reflection, as funcs.py `rot_img`/`translation_img`


def augment_support(images: Tensor) -> Tensor:
    """The official test-time support augmentation (test.py L100-124).

    Parameters: images: (K, 3, H, W) support images in [0, 1].
    Returns: (22·K, 3, H, W): the originals; 8 rotations by ±π/16, ±π/8, ±3π/16, ±π/4; 8 translations
    by (±0.2, ±0.2) and (±0.1, ±0.1); the horizontal flip; the greyscale copy (3 equal channels);
    the rotations by 90°, 180°, 270°. Warps use reflection padding. The official code then shuffles
    the set, which changes nothing in the mean and covariance, so this order is kept.
    """
    parts = [images]
    for angle in SUPPORT_ROTATIONS:
        cos, sin = math.cos(angle), math.sin(angle)
        parts.append(_affine(images, ((cos, -sin, 0.0), (sin, cos, 0.0))))
    for shift_x, shift_y in SUPPORT_TRANSLATIONS:
        parts.append(_affine(images, ((1.0, 0.0, shift_x), (0.0, 1.0, shift_y))))
    parts.append(images.flip(-1))
    weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    parts.append((images * weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1))
    # kornia `rotate` by a multiple of 90° about the centre of a square image moves pixel centres onto
    # pixel centres, so it is exactly a pixel permutation: torch.rot90
    parts += [torch.rot90(images, k, dims=(-2, -1)) for k in (1, 2, 3)]
    return torch.cat(parts)


def embedding_concat(maps: Sequence[Tensor]) -> Tensor:
    """Stack maps along channels at the first map's size, each coarser cell repeated over its block.

    PaDiM's `embedding_concat` (funcs.py L8-20) as RegAD uses it: nearest-neighbour replication
    by the integer size ratio, no channel subsampling.
    Parameters: maps: [(B, C_k, H_k, W_k)], H_0 a multiple of every H_k.
    Returns: (B, ΣC_k, H_0, W_0).
    """
    height, width = maps[0].shape[-2:]
    parts = []
    for m in maps:
        if height % m.shape[-2] or width % m.shape[-1]:
            raise ValueError(f"map size {tuple(m.shape[-2:])} does not divide {(height, width)}")
        step = height // m.shape[-2]
        parts.append(m.repeat_interleave(step, dim=-2).repeat_interleave(width // m.shape[-1], dim=-1))
    return torch.cat(parts, dim=1)


@dataclass
class PositionGaussian:
    """A Gaussian per position of the embedding grid: its mean and the Woodbury factor of its inverse covariance."""

    mean: Tensor  # (P, C) float64
    factor: Tensor  # (P, N, C) float64: W = L⁻¹ A, so that Σ⁻¹ = (I − WᵀW) / ε
    ridge: float  # ε, the 0.01·I added to the covariance


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Batched LAPACK calls on small matrices with one CPU thread.

    torch runs them one matrix at a time; more threads only add synchronisation, which on a busy
    2-core machine made a batched triangular solve 10x and a batched eigh 35x slower (measured).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_position_gaussian(embeddings: Tensor, ridge: float) -> PositionGaussian:
    """Fit mean and covariance (unbiased, + ridge·I) at every position (test.py L146-158).

    Parameters: embeddings: (N, C, P) support embeddings, N ≥ 2; ridge: ε.
    Returns: the `PositionGaussian` (float64, on the embeddings' device).
    """
    count = embeddings.shape[0]
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 embeddings; got {count}")
    x = embeddings.double().permute(2, 0, 1).contiguous()  # (P, N, C)
    mean = x.mean(dim=1)  # (P, C)
    centred = (x - mean[:, None]) / math.sqrt(count - 1)  # (P, N, C): AᵀA = the unbiased covariance
    gram = torch.bmm(centred, centred.transpose(1, 2))  # (P, N, N)
    gram.diagonal(dim1=1, dim2=2).add_(ridge)
    with _one_thread_on_cpu(x.device):
        lower, info = torch.linalg.cholesky_ex(gram)  # (P, N, N)
        if bool((info != 0).any()) or not bool(torch.isfinite(gram).all()):
            raise DetectorError(
                f"RegAD: the support covariance is not positive definite even with the ridge {ridge} (largest "
                f"|embedding| {float(x.abs().max()):.3g}); training has probably diverged: lower lr or epochs")
        factor = torch.linalg.solve_triangular(lower, centred, upper=False)  # (P, N, C)
    return PositionGaussian(mean, factor, ridge)


def mahalanobis_map(embeddings: Tensor, gaussian: PositionGaussian) -> Tensor:
    """Mahalanobis distance of each embedding to the Gaussian of its position (funcs.py `mahalanobis_torch`).

    Parameters: embeddings: (B, C, P) test embeddings.
    Returns: (B, P) sqrt((e − μ)ᵀ (Σ + εI)⁻¹ (e − μ)), float32.
    """
    x = embeddings.double().permute(2, 1, 0).contiguous()  # (P, C, B)
    out = []
    for start in range(0, x.shape[0], POSITION_CHUNK):
        end = start + POSITION_CHUNK
        delta = x[start:end] - gaussian.mean[start:end, :, None]  # (p, C, B)
        projected = torch.bmm(gaussian.factor[start:end], delta)  # (p, N, B)
        squared = (delta.square().sum(dim=1) - projected.square().sum(dim=1)) / gaussian.ridge  # (p, B)
        out.append(squared.clamp_min(0).sqrt())
    return torch.cat(out).transpose(0, 1).float()  # (B, P)


