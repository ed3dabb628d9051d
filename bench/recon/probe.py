"""Probe trained UniAD runs on synth: per-class image AUROC under other image scores, per feature layer, and
how far the reconstruction error of normal test images lies from that of the training images.

    python bench/recon/probe.py FEATS.pt RUN_DIR [RUN_DIR ...]     (FEATS.pt from bench/recon/feats.py)
"""
import itertools
import sys
from collections import defaultdict

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from baselines.uniad import UniAD
from ltbench.feature_detector import grid_to_image
from ltbench.metrics import image_score_from_map

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OBJECTS = ["disc", "nut", "pcb", "capsule", "cap", "screw"]
data = torch.load(sys.argv[1])
items, maps = data["items"], data["maps"]
index = defaultdict(lambda: defaultdict(list))
for i, (c, s, d, p) in enumerate(items):
    index[c][s].append(i)


def errors(det, idx):
    """(B, N) token error and (B, L, N) per-layer error of images idx."""
    layers = det.meta_.feature_layers
    out, per_layer = [], []
    for first in range(0, len(idx), 64):
        chunk = idx[first:first + 64]
        tokens = det._tokens([maps[name][chunk].float() for name in layers]).to(DEVICE)
        with torch.no_grad():
            diff = (det.module_(tokens) - tokens).pow(2)  # (B, N, C)
        out.append(diff.sum(-1).sqrt().cpu())
        bounds = np.cumsum([0] + [maps[name].shape[1] for name in layers])
        per_layer.append(torch.stack([diff[..., a:b].sum(-1).sqrt() for a, b in itertools.pairwise(bounds)], 1).cpu())
    return torch.cat(out), torch.cat(per_layer)


def auc(labels, scores):
    return 100 * roc_auc_score(labels, np.asarray(scores))


for run in sys.argv[2:]:
    det = UniAD.load(f"{run}/model")
    det.module_.to(DEVICE).eval()
    print(f"\n## {run}\n{det.config}")
    print("| class | protocol | max pixel | mean | " + " | ".join(f"layer {n}" for n in det.meta_.feature_layers)
          + " | train err | normal test err | anomalous test err |")
    print("|---" * (7 + len(det.meta_.feature_layers)) + "|")
    for c in index:
        test = index[c]["test"]
        labels = [int(items[i][2] != "good") for i in test]
        err, per_layer = errors(det, test)
        m = grid_to_image(err).numpy()
        cols = [auc(labels, image_score_from_map(m)), auc(labels, m.max((1, 2))), auc(labels, m.mean((1, 2)))]
        for l in range(per_layer.shape[1]):
            cols.append(auc(labels, image_score_from_map(grid_to_image(per_layer[:, l]).numpy())))
        train_err, _ = errors(det, index[c]["train"])
        lab = np.asarray(labels)
        e = err.mean(1).numpy()
        stats = [float(train_err.mean()), float(e[lab == 0].mean()), float(e[lab == 1].mean())]
        print(f"| {c} | " + " | ".join(f"{v:.1f}" for v in cols) + " | " + " | ".join(f"{v:.2f}" for v in stats) + " |")
