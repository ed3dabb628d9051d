"""Benchmark: feature extraction speed per backbone, and training on cached vs recomputed features.

Run: `python bench/features.py` (options: --help). Prints two Markdown tables:

1. images/s of `encode_image` for `lite`, `tiny-align` and `align` (the real ALIGN vision tower when
   its weights are on disk, else a randomly initialised full-size EfficientNet-B7 tower: same
   compute), and images/s of reading the same features back from the feature cache.
2. The epoch time of a small reconstruction training loop (a 2-layer MLP on the 14x14 patch tokens)
   that reads cached features, against the same loop recomputing them every epoch (the reference).

Nothing is downloaded; the cache lives in a temporary folder. Timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from ltbench import backbones
from ltbench.errors import BackboneError
from ltbench.feature_cache import FeatureCache


def make_images(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, 224, 224) deterministic images in [0, 1]."""
    return torch.rand(count, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def align_encoder(device: str) -> tuple[backbones.ImageEncoder, str]:
    """The ALIGN image encoder: real weights when available offline, else random full-size weights."""
    try:
        return backbones.create("align", device).image, "align (kakaobrain/align-base)"
    except BackboneError:
        from transformers import AlignVisionConfig, AlignVisionModel

        return backbones.AlignImageEncoder(AlignVisionModel(AlignVisionConfig()), device=device), \
            "align (B7 tower, random weights)"


def timed(step: Callable[[], None], repeats: int = 1) -> float:
    """Seconds per call of `step` (synchronising CUDA)."""
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def extraction_rates(encoder: backbones.ImageEncoder, count: int, batch_size: int) -> tuple[float, float, float]:
    """(images/s computing, images/s from the cache, bytes per cache entry)."""
    batches = make_images(count, seed=1).split(batch_size)
    encoder.encode_image(batches[0][:2])  # warm-up
    compute = timed(lambda: [encoder.encode_image(b) for b in batches])
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root, batch_size=batch_size, progress=False)
        for batch in batches:
            cache.encode(encoder, batch)
        read = timed(lambda: [cache.encode(encoder, b) for b in batches])
        entry_bytes = cache.info()["bytes"] / count
    return count / compute, count / read, entry_bytes


class TokenMLP(nn.Module):
    """A 2-layer MLP that reconstructs each patch token: (B, N, C) -> (B, N, C)."""

    def __init__(self, channels: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


def training_epochs(encoder: backbones.ImageEncoder, count: int, batch_size: int, epochs: int) -> dict[str, float]:
    """Seconds per epoch: recomputing features, filling the cache (first epoch), reading the cache."""
    images = make_images(count, seed=2)
    channels = sum(encoder.channels.values())
    torch.manual_seed(0)
    model = TokenMLP(channels).to(encoder.device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(features: backbones.Features) -> None:
        tokens = backbones.to_patch_tokens(features.maps).flatten(2).transpose(1, 2)  # (B, 196, C)
        loss = (model(tokens) - tokens).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    def epoch(get: Callable[[torch.Tensor], backbones.Features]) -> None:
        for batch in images.split(batch_size):
            step(get(batch))

    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root, batch_size=batch_size, progress=False)
        times = {"recompute": timed(lambda: epoch(encoder.encode_image), epochs),
                 "fill": timed(lambda: epoch(lambda b: cache.encode(encoder, b))),
                 "cached": timed(lambda: epoch(lambda b: cache.encode(encoder, b)), epochs)}
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=32, help="images per extraction measurement (align: a quarter)")
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2, help="epochs averaged per training measurement")
    parser.add_argument("--train-backbone", default="lite")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    print("| backbone | layers (channels @ stride) | compute img/s | cached img/s | cache / image |")
    print("| --- | --- | ---: | ---: | ---: |")
    encoders = [(backbones.create("lite", args.device).image, "lite (EfficientNet-Lite0)", args.images),
                (backbones.create("tiny-align", args.device).image, "tiny-align", args.images)]
    align, label = align_encoder(args.device)
    encoders.append((align, label, max(args.batch_size, args.images // 4)))
    for encoder, label, count in encoders:
        computed, cached, entry_bytes = extraction_rates(encoder, count, args.batch_size)
        layers = ", ".join(f"{n} {encoder.channels[n]}@{encoder.strides[n]}" for n in encoder.layer_names)
        print(f"| {label} | {layers} | {computed:.1f} | {cached:.1f} | {entry_bytes / 2**20:.2f} MiB |")

    encoder = backbones.create(args.train_backbone, args.device).image
    times = training_epochs(encoder, args.train_images, args.batch_size, args.epochs)
    print()
    print(f"Reconstruction MLP on 14x14 tokens, {args.train_backbone}, {args.train_images} images, "
          f"batch {args.batch_size} (seconds per epoch; reference: recomputing features)")
    print()
    print("| epoch | seconds | speed-up vs recompute |")
    print("| --- | ---: | ---: |")
    for name, label in (("recompute", "recompute features every epoch"), ("fill", "first epoch, filling the cache"),
                        ("cached", "later epochs, reading the cache")):
        print(f"| {label} | {times[name]:.2f} | {times['recompute'] / times[name]:.1f}x |")


if __name__ == "__main__":
    main()
