"""Post-processing of anomaly maps shared by the baselines: the Gaussian blur of their official code.

PatchCore (`RescaleSegmentor`), MKD (`gbp_localization`) and RegAD (`test.py`) all smooth their maps
with `scipy.ndimage.gaussian_filter(map, sigma=4)` (notes/baselines.md sections 3-5 and trap 13).
`gaussian_blur` is that filter in torch (on any device, batched), with scipy's defaults: kernel radius
`int(truncate * sigma + 0.5)` (truncate 4.0, so 16 for sigma 4: a 33-tap kernel) and mode "reflect"
(the edge sample is repeated: d c b a | a b c d | d c b a).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ltbench.errors import ConfigError

SCIPY_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default `truncate`


def gaussian_kernel(sigma: float, truncate: float = SCIPY_TRUNCATE, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised 1-D Gaussian of scipy's `gaussian_filter` (`_gaussian_kernel1d`, order 0).

    Parameters: sigma: standard deviation in pixels (> 0); truncate: radius in standard deviations.
    Returns: (2r + 1,) weights summing to 1, r = int(truncate * sigma + 0.5).
    """
    if not sigma > 0:
        raise ConfigError(f"a Gaussian blur needs sigma > 0; got {sigma}")
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return (weights / weights.sum()).to(dtype)


def _reflect_indices(size: int, radius: int, device: torch.device) -> Tensor:
    """Indices (size + 2r,) that pad an axis of `size` samples as scipy's mode "reflect" does, for any radius."""
    positions = torch.arange(-radius, size + radius, device=device)
    period = positions % (2 * size)  # the padded signal is periodic with period 2·size
    return torch.where(period < size, period, 2 * size - 1 - period)


def gaussian_blur(maps: Tensor, sigma: float = 4.0, truncate: float = SCIPY_TRUNCATE) -> Tensor:
    """Blur each 2-D map like `scipy.ndimage.gaussian_filter(map, sigma, truncate=truncate)` (mode "reflect").

    Parameters: maps: (..., H, W) float, any leading dimensions (each map is blurred on its own);
    sigma: standard deviation in pixels (the official baselines use 4); truncate: kernel radius in sigmas.
    Returns: (..., H, W) on the same device and dtype, separable (rows, then columns).
    """
    if maps.ndim < 2 or not maps.is_floating_point():
        raise ConfigError(f"gaussian_blur expects float maps (..., H, W); got {maps.dtype} {tuple(maps.shape)}")
    kernel = gaussian_kernel(sigma, truncate, dtype=maps.dtype).to(maps.device)
    radius = (len(kernel) - 1) // 2
    height, width = maps.shape[-2:]
    flat = maps.reshape(-1, 1, height, width)  # (N, 1, H, W)
    padded = flat[..., _reflect_indices(width, radius, maps.device)]  # (N, 1, H, W + 2r)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))  # (N, 1, H, W)
    padded = rows[..., _reflect_indices(height, radius, maps.device), :]  # (N, 1, H + 2r, W)
    blurred = F.conv2d(padded, kernel.view(1, 1, -1, 1))  # (N, 1, H, W)
    return blurred.reshape(maps.shape)
