"""DRAEM's two sub-networks and its losses, in pure torch (Zavrtanik et al., ICCV 2021).

Follows VitjanZ/DRAEM at 2dbf673 (notes/baselines.md section 1): `model_unet.py` for the
reconstructive encoder-decoder (no skip connections, no output activation) and the
discriminative U-Net, `train_DRAEM.py` `weights_init`, `loss.py` for the SSIM and focal losses.
Module names are the official ones (`encoder.block1.0.weight`, ...), so a released checkpoint's
state dict maps onto `DRAEMNetwork.reconstructive` / `.discriminative` key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_MULTIPLE = 32  # input sides must be multiples of 2^5: the discriminative U-Net max-pools 5 times


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """conv3x3 (padding 1, with bias) → BatchNorm → ReLU, the official building unit."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def double_block(in_channels: int, out_channels: int, middle: int | None = None) -> nn.Sequential:
    """(conv-BN-ReLU) × 2; `middle` = channels after the first conv (default `out_channels`)."""
    middle = out_channels if middle is None else middle
    return nn.Sequential(*conv_bn_relu(in_channels, middle), *conv_bn_relu(middle, out_channels))


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Bilinear ×2 (align_corners=True, as the official nn.Upsample) → conv-BN-ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *conv_bn_relu(in_channels, out_channels))


class EncoderReconstructive(nn.Module):
    """5 double blocks (w, 2w, 4w, 8w, 8w) with 4 max-pools: (B, 3, S, S) → (B, 8w, S/16, S/16)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.block1 = double_block(in_channels, width)
        self.mp1 = nn.Sequential(nn.MaxPool2d(2))
        self.block2 = double_block(width, width * 2)
        self.mp2 = nn.Sequential(nn.MaxPool2d(2))
        self.block3 = double_block(width * 2, width * 4)
        self.mp3 = nn.Sequential(nn.MaxPool2d(2))
        self.block4 = double_block(width * 4, width * 8)
        self.mp4 = nn.Sequential(nn.MaxPool2d(2))
        self.block5 = double_block(width * 8, width * 8)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.block1(x)  # (B, w, S, S)
        b2 = self.block2(self.mp1(b1))  # (B, 2w, S/2, S/2)
        b3 = self.block3(self.mp3(b2))  # the official forward reuses mp3 for mp2 (both are MaxPool2d(2))
        b4 = self.block4(self.mp3(b3))  # (B, 8w, S/8, S/8)
        return self.block5(self.mp4(b4))  # (B, 8w, S/16, S/16)


class DecoderReconstructive(nn.Module):
    """4 × (up-conv, double block) without skips, then conv3x3 to the output: (B, 8w, S/16) → (B, 3, S, S)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.up1 = up_block(width * 8, width * 8)
        self.db1 = double_block(width * 8, width * 4, middle=width * 8)
        self.up2 = up_block(width * 4, width * 4)
        self.db2 = double_block(width * 4, width * 2, middle=width * 4)
        self.up3 = up_block(width * 2, width * 2)
        self.db3 = double_block(width * 2, width, middle=width * 2)
        self.up4 = up_block(width, width)
        self.db4 = double_block(width, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, bottleneck: Tensor) -> Tensor:
        x = self.db1(self.up1(bottleneck))  # (B, 4w, S/8, S/8)
        x = self.db2(self.up2(x))  # (B, 2w, S/4, S/4)
        x = self.db3(self.up3(x))  # (B, w, S/2, S/2)
        x = self.db4(self.up4(x))  # (B, w, S, S)
        return self.fin_out(x)  # (B, 3, S, S), no activation (traps 1)


class ReconstructiveSubNetwork(nn.Module):
    """The reconstructive sub-network (official base_width 128)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128):
        super().__init__()
        self.encoder = EncoderReconstructive(in_channels, base_width)
        self.decoder = DecoderReconstructive(base_width, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class EncoderDiscriminative(nn.Module):
    """6 double blocks (w, 2w, 4w, 8w, 8w, 8w) with 5 max-pools; returns every block's output for the skips."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8, width * 8, width * 8]
        previous = in_channels
        for index, channels in enumerate(widths, start=1):
            setattr(self, f"block{index}", double_block(previous, channels))
            if index < len(widths):
                setattr(self, f"mp{index}", nn.Sequential(nn.MaxPool2d(2)))
            previous = channels

    def forward(self, x: Tensor) -> list[Tensor]:
        blocks = [self.block1(x)]  # (B, w, S, S)
        for index in range(2, 7):
            pool = getattr(self, f"mp{index - 1}")
            blocks.append(getattr(self, f"block{index}")(pool(blocks[-1])))
        return blocks  # b1 … b6; b6 is (B, 8w, S/32, S/32)


class DecoderDiscriminative(nn.Module):
    """5 × (up-conv, concatenate the encoder block of that size, double block), then conv3x3 to 2 logits."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.up_b = up_block(width * 8, width * 8)
        self.db_b = double_block(width * (8 + 8), width * 8)
        self.up1 = up_block(width * 8, width * 4)
        self.db1 = double_block(width * (4 + 8), width * 4)
        self.up2 = up_block(width * 4, width * 2)
        self.db2 = double_block(width * (2 + 4), width * 2)
        self.up3 = up_block(width * 2, width)
        self.db3 = double_block(width * (2 + 1), width)
        self.up4 = up_block(width, width)
        self.db4 = double_block(width * 2, width)
        self.fin_out = nn.Sequential(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, blocks: list[Tensor]) -> Tensor:
        b1, b2, b3, b4, b5, b6 = blocks
        x = self.db_b(torch.cat((self.up_b(b6), b5), dim=1))  # (B, 8w, S/16, S/16)
        x = self.db1(torch.cat((self.up1(x), b4), dim=1))  # (B, 4w, S/8, S/8)
        x = self.db2(torch.cat((self.up2(x), b3), dim=1))  # (B, 2w, S/4, S/4)
        x = self.db3(torch.cat((self.up3(x), b2), dim=1))  # (B, w, S/2, S/2)
        x = self.db4(torch.cat((self.up4(x), b1), dim=1))  # (B, w, S, S)
        return self.fin_out(x)  # (B, 2, S, S) logits


class DiscriminativeSubNetwork(nn.Module):
    """The discriminative U-Net (official base_channels 64, 6 input channels, 2 output logits)."""

    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_channels: int = 64):
        super().__init__()
        self.encoder_segment = EncoderDiscriminative(in_channels, base_channels)
        self.decoder_segment = DecoderDiscriminative(base_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder_segment(self.encoder_segment(x))


class DRAEMNetwork(nn.Module):
    """Both sub-networks; `forward` returns (reconstruction (B, 3, S, S), segmentation logits (B, 2, S, S)).

    The discriminative input is `cat(reconstruction, input)` in that order (train_DRAEM.py L66-69);
    in training the focal loss's gradient flows into the reconstructive network too, as there.
    """

    def __init__(self, reconstructive_width: int = 128, discriminative_width: int = 64):
        super().__init__()
        self.reconstructive = ReconstructiveSubNetwork(3, 3, reconstructive_width)
        self.discriminative = DiscriminativeSubNetwork(6, 2, discriminative_width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        reconstruction = self.reconstructive(x)  # (B, 3, S, S)
        logits = self.discriminative(torch.cat((reconstruction, x), dim=1))  # (B, 2, S, S)
        return reconstruction, logits


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """The official `weights_init`, every draw from `generator`: conv weights ~ N(0, 0.02); BN weight ~ N(1, 0.02), bias 0.

    The official code leaves conv biases at PyTorch's default, U(±1/√fan_in); they are redrawn here from
    that same distribution so that the whole initialisation is determined by the seed.
    """
    for layer in module.modules():
        with torch.no_grad():
            if isinstance(layer, nn.Conv2d):
                layer.weight.normal_(0.0, 0.02, generator=generator)
                if layer.bias is not None:
                    fan_in = layer.weight[0].numel()  # in_channels / groups · k · k
                    layer.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
            elif isinstance(layer, nn.BatchNorm2d):
                layer.weight.normal_(1.0, 0.02, generator=generator)
                layer.bias.zero_()


# ----------------------------------------------------------------------------- losses


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """(size, size) normalised Gaussian window (loss.py `create_window`: the outer product of the 1-D window)."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    one = torch.exp(-x**2 / (2 * sigma**2))
    one = one / one.sum()
    return torch.outer(one, one).float()


def ssim_loss(reconstruction: Tensor, target: Tensor, window_size: int = 11) -> Tensor:
    """1 − mean SSIM over every pixel and channel, as loss.py `SSIM` (11×11 Gaussian σ 1.5, zero padding).

    The dynamic range L is chosen from the **reconstruction** (traps 5): max 255 if max > 128 else 1,
    min −1 if min < −0.5 else 0. Parameters: reconstruction, target: (B, C, H, W). Returns: a scalar.
    """
    channels = reconstruction.shape[1]
    max_value = 255.0 if float(reconstruction.detach().max()) > 128 else 1.0
    min_value = -1.0 if float(reconstruction.detach().min()) < -0.5 else 0.0
    dynamic_range = max_value - min_value
    window = gaussian_window(window_size).to(reconstruction)[None, None].expand(channels, 1, -1, -1)
    pad = window_size // 2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, window, padding=pad, groups=channels)

    mu1, mu2 = blur(reconstruction), blur(target)
    sigma1 = blur(reconstruction * reconstruction) - mu1 * mu1
    sigma2 = blur(target * target) - mu2 * mu2
    sigma12 = blur(reconstruction * target) - mu1 * mu2
    c1, c2 = (0.01 * dynamic_range) ** 2, (0.03 * dynamic_range) ** 2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1 * mu1 + mu2 * mu2 + c1) * (sigma1 + sigma2 + c2))
    return 1.0 - ssim_map.mean()


def focal_loss(probabilities: Tensor, mask: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """The official focal loss on **softmax probabilities** (loss.py `FocalLoss`, alpha all ones), averaged over pixels.

    pt = Σ_c clamp(onehot, smooth/(C−1), 1−smooth)_c · p_c + smooth; loss = −(1 − pt)^γ · log pt.
    Parameters: probabilities: (B, C, H, W) softmax output; mask: (B, 1, H, W) class indices (0/1).
    Returns: a scalar.
    """
    classes = probabilities.shape[1]
    onehot = F.one_hot(mask[:, 0].long(), classes).permute(0, 3, 1, 2).to(probabilities)  # (B, C, H, W)
    onehot = onehot.clamp(smooth / (classes - 1), 1.0 - smooth)
    pt = (onehot * probabilities).sum(1) + smooth  # (B, H, W)
    return (-(1.0 - pt).pow(gamma) * pt.log()).mean()


def draem_loss(reconstruction: Tensor, target: Tensor, logits: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """L2 + SSIM + focal, all weights 1 (train_DRAEM.py L70-76). Returns (loss, the three parts as floats)."""
    l2 = F.mse_loss(reconstruction, target)
    ssim = ssim_loss(reconstruction, target)
    focal = focal_loss(torch.softmax(logits, dim=1), mask)
    return l2 + ssim + focal, {"l2": l2.item(), "ssim": ssim.item(), "focal": focal.item()}


def image_score_from_map(anomaly_map: Tensor, window: int = 21) -> Tensor:
    """DRAEM's image score: max of the `window`×`window` mean-filtered map (zero padding counted, test_DRAEM.py L105-107).

    Parameters: anomaly_map: (B, H, W). Returns: (B,).
    """
    smoothed = F.avg_pool2d(anomaly_map[:, None], window, stride=1, padding=window // 2, count_include_pad=True)
    return smoothed.flatten(1).max(dim=1).values
