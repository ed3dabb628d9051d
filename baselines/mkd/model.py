"""MKD's pure-torch pieces: the "cloner" student, the distillation loss and guided-backprop saliency.

Each follows rohban-lab/Knowledge_Distillation_AD `0c574ae` (notes/baselines.md section 3, trap 8):
- `Cloner`: `make_layers(cfg, use_bias=False, batch_norm=True)` (models/network.py L43-60): conv3×3
  (padding 1, no bias, xavier-uniform) + BN + ReLU, except the conv right before each max-pool
  (conv + ReLU only); the student's outputs compared with the teacher are its max-pool outputs;
- `distillation_loss`: `MseDirectionLoss` (loss_functions.py L5-29) and `detection_test`'s score
  (test_functions.py L12-67): per sample, Σ_l [1 − cos(vec S_l, vec T_l)] + λ · Σ_l mean((S_l − T_l)²);
- `guided_relus` + `saliency_maps`: `GuidedBackprop` on the student's ReLUs and `gbp_localization`
  (test_functions.py L240-331, utils.py L11-17): |∂ score / ∂ input| summed over channels, scaled by
  its 99th percentile and clipped to [0, 1], min-max normalised, blurred with σ = 4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltbench.maps import gaussian_blur

# models/network.py cfg 'B' ("cloner", equal_network_size False), one tuple per max-pool stage
CLONER_B = ((16, 16), (16, 128), (16, 16, 256), (16, 16, 512), (16, 16, 512))


class Cloner(nn.Module):
    """The MKD student: VGG-like stages of conv3×3 ending in a 2×2 max-pool; returns every stage's pooled output.

    Parameters: stages: conv widths per stage (official `CLONER_B`); the last width of a stage whose
    output is compared must equal the teacher's channels there; pool_relu: the ReLU between the last conv
    of a stage and its pool (official; without it the student can also match signed teacher maps).
    Module names follow the official `features` Sequential, so `features.N.*` keys match its checkpoints.
    """

    def __init__(self, stages: Sequence[Sequence[int]] = CLONER_B, pool_relu: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        self.pool_indices: list[int] = []
        channels = 3
        for widths in stages:
            for position, width in enumerate(widths):
                conv = nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False)
                nn.init.xavier_uniform_(conv.weight)
                before_pool = position == len(widths) - 1  # make_layers: no BN when the next item is 'M'
                if before_pool:
                    layers += [conv, nn.ReLU(inplace=True)] if pool_relu else [conv]
                else:
                    layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            self.pool_indices.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, S, S) unnormalised pixels → per stage s the pooled map (B, C_s, S / 2^(s+1), S / 2^(s+1))."""
        pooled = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.pool_indices:
                pooled.append(x)
        return pooled


def distillation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], lam: float) -> Tensor:
    """Per-sample MKD loss over matching layers: Σ_l [1 − cos(vec S_l, vec T_l)] + λ · Σ_l mean((S_l − T_l)²).

    Parameters: student, teacher: per layer (B, C_l, H_l, W_l), same shapes; lam: λ, the weight of the MSE term.
    Returns: (B,) — training takes its mean (= the official batch-mean cosine term + λ·`nn.MSELoss`), the
    image score is the value itself.
    """
    total = torch.zeros(len(student[0]), device=student[0].device)
    for s, t in zip(student, teacher, strict=True):
        assert s.shape == t.shape, f"student map {tuple(s.shape)} does not match the teacher's {tuple(t.shape)}"
        direction = 1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)  # cosine over C·H·W, not per pixel
        value = (s - t).pow(2).flatten(1).mean(1)
        total = total + direction + lam * value
    return total


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients, and only where the ReLU was active."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0)  # official hook: 1[output > 0] · clamp(grad_in, min=0)


@contextlib.contextmanager
def guided_relus(module: nn.Module) -> Iterator[None]:
    """Guided backpropagation through every `nn.ReLU` of `module` (the student only, as the official hooks)."""
    relus = [m for m in module.modules() if isinstance(m, nn.ReLU)]
    for relu in relus:
        relu.forward = _GuidedReLU.apply  # an instance attribute shadows nn.ReLU.forward
    try:
        yield
    finally:
        for relu in relus:
            del relu.forward


def saliency_maps(gradients: Tensor, sigma: float) -> Tensor:
    """Input gradients (B, 3, H, W) → (B, H, W) maps as `gbp_localization`: grey, percentile-scaled, min-max, blurred.

    A map whose gradient is constant (99th percentile = minimum) becomes zeros instead of the official NaN.
    """
    grey = gradients.abs().sum(1)  # (B, H, W) convert_to_grayscale: Σ_c |g|
    flat = grey.flatten(1)
    low = flat.min(1).values[:, None]
    high = torch.quantile(flat, 0.99, dim=1)[:, None]  # np.percentile(…, 99), linear interpolation
    scaled = torch.where(high > low, ((flat - low) / (high - low)).clamp(0, 1), torch.zeros_like(flat))
    low, high = scaled.min(1).values[:, None], scaled.max(1).values[:, None]  # then abs() and min-max per image
    scaled = torch.where(high > low, (scaled - low) / (high - low), torch.zeros_like(scaled))
    return gaussian_blur(scaled.view_as(grey), sigma)
