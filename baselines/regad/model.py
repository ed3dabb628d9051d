"""RegAD's networks in pure torch, in data-flow order: stages with spatial transformers, Siamese heads, the loss.

Follows MediaBrain-SJTU/RegAD `5e2c1f8` (`/work/shared/notes/baselines.md` section 4):
- `STNModule` (models/stn.py L48-152, mode `rotation_scale`): a small conv trunk and two FC layers
  predict (angle a, scale sx, sy); the map is warped with θ = [[cos a·sx, −sin a, 0], [sin a, cos a·sy, 0]]
  by `affine_grid` + `grid_sample` (bilinear, reflection padding, align_corners False).
- `STNEncoder` (models/stn.py `ResNet.forward` L238-271): backbone stages, each followed by a spatial
  transformer whose *warped* output feeds the next stage; the features kept for the Gaussian are
  each stage's warped output warped back by the inverse transforms (θ_k⁻¹, …, θ_1⁻¹), detached.
  The stages are any list of `nn.Module`s, so ResNet-18's layer1–3 and EfficientNet-Lite0's
  stride-4/8/16 stages both fit.
- `ProjectionHead` / `PredictionHead` (models/siamese.py L27-77) and `symmetric_cosine_loss`
  (losses/norm_loss.py L20-26, train.py L181-185): SimSiam on the last warped map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STN_PARAMS = 3  # rotation_scale: angle (radians), scale x, scale y (models/stn.py N_PARAMS)
STN_IDENTITY = (0.0, 1.0, 1.0)  # the last FC's bias at initialisation: no rotation, unit scale (L78-79)
STN_HIDDEN = 1024  # FC width (models/stn.py L66)
STN_CONV_CHANNELS = (64, 16)  # the trunk's two conv widths (models/stn.py L54-63)


def warp(x: Tensor, theta: Tensor) -> Tensor:
    """Resample maps with affine transforms, as the official `_fixstn` / STN forward.

    Parameters: x: (B, C, H, W); theta: (B, 2, 3) in normalised coordinates.
    Returns: (B, C, H, W), bilinear, reflection padding, align_corners False (torch's default, which
    the official code relies on).
    """
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def invert_affine(theta: Tensor) -> Tensor:
    """The inverse of each 2×3 affine transform (official: numpy `inv` of the 3×3 completion, stn.py L246).

    Parameters: theta: (B, 2, 3). Returns: (B, 2, 3).
    """
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(len(theta), 1, 3)
    full = torch.cat([theta, bottom], dim=1)  # (B, 3, 3)
    return torch.linalg.inv(full)[:, :2]


def rotation_scale_theta(params: Tensor) -> Tensor:
    """(B, 3) = (angle, sx, sy) → (B, 2, 3): [[cos a·sx, −sin a, 0], [sin a, cos a·sy, 0]] (models/stn.py L121-126)."""
    angle, sx, sy = params.unbind(dim=1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    return torch.stack([torch.stack([cos * sx, -sin, zero], dim=1),
                        torch.stack([sin, cos * sy, zero], dim=1)], dim=1)


class STNModule(nn.Module):
    """A spatial transformer after one stage (official `STNModule`, mode rotation_scale).

    Parameters: channels: the stage's output channels; map_size: its output side (56/28/14 at 224 input
    for strides 4/8/16); the FC input is 16 × f × f with f = map_size after two stride-2 max-pools
    (official `56 // (4 * block_index)` = 14, 7, 4).
    """

    def __init__(self, channels: int, map_size: int):
        super().__init__()
        wide, narrow = STN_CONV_CHANNELS
        self.conv = nn.Sequential(
            nn.Conv2d(channels, wide, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(wide), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            nn.Conv2d(wide, narrow, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(narrow), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        pooled = math.ceil(math.ceil(map_size / 2) / 2)
        self.fc = nn.Sequential(nn.Linear(narrow * pooled * pooled, STN_HIDDEN), nn.ReLU(True),
                                nn.Linear(STN_HIDDEN, STN_PARAMS))
        # start at the identity transform (models/stn.py L69-70, L78-79)
        nn.init.zeros_(self.fc[2].weight)
        with torch.no_grad():
            self.fc[2].bias.copy_(torch.tensor(STN_IDENTITY))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) → (warped map (B, C, H, W), θ (B, 2, 3))."""
        params = self.fc(self.conv(x).flatten(1))  # (B, 3)
        theta = rotation_scale_theta(params)
        return warp(x, theta), theta


class STNEncoder(nn.Module):
    """Backbone stages, each followed by a spatial transformer (official `ResNet` of models/stn.py).

    Parameters: stages: the backbone cut into consecutive `nn.Module`s (the first one takes the
    image); channels / map_sizes: each stage's output channels and side at 224 input.
    """

    def __init__(self, stages: Sequence[nn.Module], channels: Sequence[int], map_sizes: Sequence[int]):
        super().__init__()
        if not len(stages) == len(channels) == len(map_sizes) >= 1:
            raise ValueError(f"one channel count and map size per stage; got {len(stages)} stages, "
                             f"{len(channels)} channels, {len(map_sizes)} sizes")
        self.stages = nn.ModuleList(stages)
        self.stns = nn.ModuleList(STNModule(c, s) for c, s in zip(channels, map_sizes))

    def forward(self, images: Tensor, aligned: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Run the stages and transformers.

        Parameters: images: (B, 3, H, W) as the backbone takes them; aligned: also return the
        inverse-warped maps (the official `stnK_output`).
        Returns: (the last stage's warped map (B, C_L, H_L, W_L), [aligned map (B, C_k, H_k, W_k) per
        stage, detached] or [] when `aligned` is False).
        """
        x = images
        inverses: list[Tensor] = []
        kept: list[Tensor] = []
        for stage, stn in zip(self.stages, self.stns):
            x, theta = stn(stage(x))
            inverses.append(invert_affine(theta.detach()))
            if aligned:
                back = x.detach()
                for inverse in reversed(inverses):  # θ_k⁻¹ first, θ_1⁻¹ last (stn.py L252-271)
                    back = warp(back, inverse)
                kept.append(back)
        return x, kept


def _conv_bn_relu(channels: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, kernel_size=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]


class ProjectionHead(nn.Module):
    """The Siamese encoder: (1×1 conv, BN, ReLU) × 2, then a 1×1 conv; no biases (models/siamese.py `Encoder`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.layers = nn.Sequential(*_conv_bn_relu(channels), *_conv_bn_relu(channels),
                                    nn.Conv2d(channels, channels, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) → (B, C, h, w)."""
        return self.layers(x)


class PredictionHead(nn.Module):
    """The Siamese predictor: 1×1 conv, BN, ReLU, 1×1 conv; no biases (models/siamese.py `Predictor`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.layers = nn.Sequential(*_conv_bn_relu(channels), nn.Conv2d(channels, channels, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) → (B, C, h, w)."""
        return self.layers(x)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """−cos(p, stop-gradient(z)) over channels, averaged over batch and positions (official `CosLoss`, Mean=True).

    Parameters: p, z: (B, C, h, w). Returns: a scalar.
    """
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def symmetric_cosine_loss(p_query: Tensor, z_query: Tensor, p_support: Tensor, z_support: Tensor) -> Tensor:
    """D(p_q, z_s)/2 + D(p_s, z_q)/2 with D = `negative_cosine` (train.py L181-185)."""
    return negative_cosine(p_query, z_support) / 2 + negative_cosine(p_support, z_query) / 2


class RegADNetwork(nn.Module):
    """Everything RegAD learns and keeps: the STN encoder, the Siamese heads and the test support images.

    Parameters: encoder: the `STNEncoder`; channels: its last stage's channels (the heads' width);
    support_shape: (classes, draws, K) of the support images kept for testing (uint8, 224×224 RGB;
    zeros for a class that has too few training images).
    """

    def __init__(self, encoder: STNEncoder, channels: int, support_shape: tuple[int, int, int], image_size: int):
        super().__init__()
        self.encoder = encoder
        self.projector = ProjectionHead(channels)
        self.predictor = PredictionHead(channels)
        self.register_buffer("support_images", torch.zeros(*support_shape, 3, image_size, image_size, dtype=torch.uint8))

    def pair_loss(self, queries: Tensor, supports: Tensor) -> Tensor:
        """The training loss of queries against the mean of their supports' features (train.py L163-185).

        Parameters: queries: (B, 3, H, W); supports: (B, K, 3, H, W) of the same classes.
        Returns: a scalar. Queries and supports pass the encoder separately, as in the official code
        (so batch-norm statistics are taken over each group on its own).
        """
        batch, shots = supports.shape[:2]
        query_features, _ = self.encoder(queries)  # (B, C, h, w)
        support_features, _ = self.encoder(supports.flatten(0, 1))  # (B·K, C, h, w)
        support_features = support_features.view(batch, shots, *support_features.shape[1:]).mean(dim=1)
        z_query, z_support = self.projector(query_features), self.projector(support_features)
        return symmetric_cosine_loss(self.predictor(z_query), z_query, self.predictor(z_support), z_support)
