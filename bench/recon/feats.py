"""Encode a synth split's training images and every synth test image with `lite`; save the four feature maps.

    python bench/recon/feats.py [SPLIT] [OUT.pt] [LIMIT]   (default exp100, feats-exp100.pt; LIMIT: first images only)

The maps are kept as float16, exactly as the feature cache stores them, so the probes in this folder see the
detectors' own inputs.
"""
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ltbench.backbones import create
from ltbench.data import load_image
from ltbench.datasets import synth

split = sys.argv[1] if len(sys.argv) > 1 else "exp100"
out_path = sys.argv[2] if len(sys.argv) > 2 else f"feats-{split}.pt"
device = "cuda" if torch.cuda.is_available() else "cpu"
root = synth.ensure_generated()
with open(Path(__file__).resolve().parents[2] / "splits" / "synth" / f"{split}.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
encoder = create("lite", device=device).image
items = [(r["class_name"], "train", "good", r["image"]) for r in rows]
for c in synth.CLASS_ORDER:
    for defect in sorted(p.name for p in (root / c / "test").iterdir()):
        items += [(c, "test", defect, f"{c}/test/{defect}/{p.name}") for p in sorted((root / c / "test" / defect).glob("*.png"))]
items = items[:int(sys.argv[3])] if len(sys.argv) > 3 else items
maps = {name: [] for name in encoder.layer_names}
norms, rounding = [], []   # UniAD quick tokens (all four maps at 14 x 14): per-layer norms, float16 rounding
for first in range(0, len(items), 32):
    features = encoder.encode_image(torch.stack([load_image(root / it[3]) for it in items[first:first + 32]]))
    for name in encoder.layer_names:
        maps[name].append(features.maps[name].half().cpu())
    tokens = [F.interpolate(m.float(), size=(14, 14), mode="bilinear", align_corners=False) for m in features.maps.values()]
    norms.append(torch.stack([t.norm(dim=1).flatten() for t in tokens]))   # (L, B*196)
    whole = torch.cat(tokens, 1)
    rounding.append(torch.stack([whole.norm(dim=1).flatten(), (whole - whole.half().float()).norm(dim=1).flatten()]))
norms, rounding = torch.cat(norms, 1), torch.cat(rounding, 1)
channels = sum(encoder.channels.values())
print("token norm per layer (mean over tokens): " + ", ".join(
    f"{n} ({encoder.channels[n]} ch) {v:.2f}" for n, v in zip(encoder.layer_names, norms.mean(1).tolist())))
print(f"whole token ({channels} ch): norm {rounding[0].mean():.2f}; float16 rounding error norm {rounding[1].mean():.2e} "
      f"(max {rounding[1].max():.2e}); feature jitter (scale 20) noise norm = 20 * sqrt(C) / C * norm = "
      f"{20 / channels ** 0.5:.2f} x norm, i.e. per layer: " + ", ".join(
          f"{n} {20 / channels * rounding[0].mean() * encoder.channels[n] ** 0.5 / v:.2f} x its own norm"
          for n, v in zip(encoder.layer_names, norms.mean(1).tolist())))
torch.save({"items": items, "maps": {n: torch.cat(v) for n, v in maps.items()}, "layers": encoder.layer_names}, out_path)
print(f"{len(items)} images -> {out_path}")
