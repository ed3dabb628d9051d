"""Per-class 1-NN image AUROC on different token recipes of the same `lite` features (no training).

    python bench/recon/knn.py FEATS.pt [VARIANT-SUBSTRING ...]

Each test token's score is its L2 distance to the nearest training token of its class (any position); the map is
upsampled like UniAD's and the image score is the protocol's. The first variant is exactly UniAD's quick tokens.
"""
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ltbench.metrics import image_score_from_map

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
data = torch.load(sys.argv[1])
items, maps, layers = data["items"], data["maps"], data["layers"]
def tokens(sel, grid, aa=False):
    out = []
    for n in sel:
        m = maps[n].float()
        if m.shape[-1] != grid:
            m = F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=False, antialias=aa)
        out.append(m)
    return torch.cat(out, 1).flatten(2).transpose(1, 2).half().float()   # (B, N, C)
L = layers
variants = {
    "uniad14 (s2,4,8,16)": (L, 14, False),
    "uniad14 antialias": (L, 14, True),
    "s8+s16 @14": (L[2:], 14, False),
    "uniad28": (L, 28, False),
    "uniad28 antialias": (L, 28, True),
    "s8+s16 @28": (L[2:], 28, False),
    "s2 only @14": (L[:1], 14, False),
    "s4 only @14": (L[1:2], 14, False),
}
if len(sys.argv) > 2:
    variants = {k: v for k, v in variants.items() if any(s in k for s in sys.argv[2:])}
classes = list(dict.fromkeys(c for c, *_ in items))
by = defaultdict(lambda: defaultdict(list))
for i, (c, s, d, p) in enumerate(items):
    by[c][s].append(i)
print("class".ljust(10) + "".join(k[:20].rjust(21) for k in variants))
res = defaultdict(dict)
for name, (sel, grid, aa) in variants.items():
    tok = tokens(sel, grid, aa)
    for c in classes:
        tr = tok[by[c]["train"]].reshape(-1, tok.shape[-1]).to(DEVICE)
        te_idx = by[c]["test"]
        te = tok[te_idx].to(DEVICE)
        d = torch.stack([torch.cdist(te[b], tr).min(1).values for b in range(len(te))]).cpu()  # (B, N) L2
        g = grid
        m = F.interpolate(d.view(-1, 1, g, g), size=(224, 224), mode="bilinear", align_corners=True)[:, 0]
        score = torch.as_tensor(image_score_from_map(m.numpy()))
        label = [int(items[i][2] != "good") for i in te_idx]
        res[c][name] = roc_auc_score(label, score.numpy())
for c in classes:
    print(c.ljust(10) + "".join(f"{res[c][k]:21.3f}" for k in variants))
