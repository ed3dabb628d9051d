"""The shared Gaussian blur (`ltbench.maps`) against scipy's `gaussian_filter`, the baselines' official filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ltbench.errors import ConfigError
from ltbench.maps import gaussian_blur, gaussian_kernel


@pytest.mark.parametrize("shape, sigma", [((3, 224, 224), 4.0), ((2, 28, 28), 4.0), ((1, 5, 9), 4.0),
                                          ((2, 30, 17), 1.5), ((4, 128, 128), 4.0)])
def test_blur_equals_scipy_gaussian_filter_per_map(shape, sigma):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gaussian_blur(maps, sigma)
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])  # scipy's defaults
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-12)
    # float32 in, float32 out, within float32 rounding
    single = gaussian_blur(maps.float(), sigma)
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), expected, rtol=0, atol=1e-5)


def test_kernel_radius_is_scipys_truncate_rule():
    assert len(gaussian_kernel(4.0)) == 33  # int(4 * 4 + 0.5) = 16
    assert len(gaussian_kernel(1.5)) == 13  # int(4 * 1.5 + 0.5) = 6
    assert abs(float(gaussian_kernel(4.0).sum()) - 1.0) < 1e-12


def test_leading_dimensions_are_kept_and_bad_input_is_refused():
    maps = torch.rand(2, 3, 20, 20)
    assert gaussian_blur(maps).shape == (2, 3, 20, 20)
    with pytest.raises(ConfigError, match="sigma"):
        gaussian_blur(maps, sigma=0.0)
    with pytest.raises(ConfigError, match="float maps"):
        gaussian_blur(torch.ones(5, dtype=torch.int64))
