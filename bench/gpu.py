"""GPU benchmark (issue 9): feature extraction, phase-2 epoch time on cached features, prediction, memory.

Prints one table. Reference points are named in each row: extraction is timed per backbone,
an epoch is the difference between a fit with k+1 and with k epochs (both reading the feature
cache, so the difference is pure training on cached features), prediction includes the backbone.

    python bench/gpu.py --device cuda                 # what bench/gpu.sh runs (< 8 minutes on one GPU)
    python bench/gpu.py --device cpu --train-images 48 --test-images 16   # a smoke test on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from features import align_encoder, make_images

from ltbench import backbones
from ltbench.errors import BackboneError
from ltbench.testing import TensorTrainSet

MVTEC_LT_IMAGES = 1_100  # about the size of MVTec-LT exp100 (1,342) / exp200 training sets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def extraction(encoder: backbones.ImageEncoder, images: torch.Tensor, device: torch.device, batch: int) -> float:
    """Images per second through `encoder.encode_image` (after one warm-up batch)."""
    with torch.no_grad():
        encoder.encode_image(images[:batch].to(device))
        sync(device)
        start = time.perf_counter()
        for first in range(0, len(images), batch):
            encoder.encode_image(images[first:first + batch].to(device))
        sync(device)
    return len(images) / (time.perf_counter() - start)


def timed_fit(cls, config, train: TensorTrainSet, device: torch.device):
    sync(device)
    start = time.perf_counter()
    detector = cls(config).fit(train)
    sync(device)
    return detector, time.perf_counter() - start


def model_rows(name: str, cls, configs: tuple, images, class_idx, classes, test, device, work: Path) -> list[tuple]:
    """Epoch time (fit with more epochs minus fit with fewer, features cached) and prediction rate."""
    fits = []
    for i, config in enumerate(configs):
        train = TensorTrainSet(images, class_idx, classes, work / f"{name}-{i}", device=device)
        reset_peak(device)
        fits.append(timed_fit(cls, config, train, device))
    epoch = fits[2][1] - fits[1][1]  # fits 1 and 2 both read the cache filled by fit 0
    detector = fits[2][0]
    reset_peak(device)
    with torch.no_grad():
        detector.predict(test[:8].to(device), torch.zeros(8, dtype=torch.long, device=device))  # warm-up
        sync(device)
        start = time.perf_counter()
        for first in range(0, len(test), 32):
            chunk = test[first:first + 32].to(device)
            detector.predict(chunk, torch.zeros(len(chunk), dtype=torch.long, device=device))
        sync(device)
    rate = len(test) / (time.perf_counter() - start)
    return [(f"{name}: one training epoch on cached features ({len(images)} images)", f"{epoch:.2f} s",
             peak_memory(device)),
            (f"{name}: prediction", f"{rate:.1f} img/s", peak_memory(device))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-images", type=int, default=MVTEC_LT_IMAGES)
    parser.add_argument("--test-images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="extraction batch size")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device; use --device cpu for a smoke test")
    os.environ.setdefault("LTBENCH_HOME", tempfile.mkdtemp(prefix="ltbench-gpu-bench-"))  # a cold cache
    torch.backends.cudnn.benchmark = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[tuple] = []

    images = make_images(max(args.batch * 4, 64))
    align, align_label = align_encoder(str(device))
    rows.append((f"feature extraction, {align_label}", f"{extraction(align, images, device, args.batch):.1f} img/s", ""))
    lite = backbones.create("lite", device).image
    rows.append(("feature extraction, lite (EfficientNet-Lite0)", f"{extraction(lite, images, device, args.batch):.1f} img/s", ""))
    del align

    try:  # the paper's setup when ALIGN's weights are on this machine, else the offline backbone
        backbones.create("align", device)
        backbone = "align"
    except BackboneError:
        backbone = "lite"
    from baselines.uniad import UniAD, UniADConfig
    from ltad_model import LTAD, LTADConfig

    classes = [f"class{i}" for i in range(15)]
    train_images = make_images(args.train_images, seed=1)
    class_idx = torch.arange(args.train_images) % len(classes)
    test = make_images(args.test_images, seed=2)
    work = Path(tempfile.mkdtemp(prefix="ltbench-gpu-fit-"))
    uniad = tuple(UniADConfig(backbone=backbone, epochs=e) for e in (1, 1, 2))  # paper-size transformer
    ltad = tuple(LTADConfig(backbone=backbone, epochs_phase1=1, epochs_phase2=e) for e in (1, 1, 2))
    rows += model_rows(f"uniad ({backbone})", UniAD, uniad, train_images, class_idx, classes, test, device, work)
    rows += model_rows(f"ltad phase 2 ({backbone})", LTAD, ltad, train_images, class_idx, classes, test, device, work)

    print(f"\nLTBench GPU benchmark on {gpu}, torch {torch.__version__}\n")
    width = max(len(r[0]) for r in rows)
    print(f"| {'what':<{width}} | value | peak GPU memory |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for what, value, memory in rows:
        print(f"| {what:<{width}} | {value} | {memory} |")


if __name__ == "__main__":
    main()
