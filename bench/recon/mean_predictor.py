"""What a reconstruction that learned nothing but the average would score: each token "reconstructed" as the mean
training token at its position (of its class, or of all classes), on UniAD's quick tokens.

    python bench/recon/mean_predictor.py FEATS.pt

Prints per class the mean token error on training images (comparable to probe.py's "train err") and the image
AUROC of the protocol score on the error map.
"""
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ltbench.feature_detector import grid_to_image
from ltbench.metrics import image_score_from_map

data = torch.load(sys.argv[1])
items, maps, layers = data["items"], data["maps"], data["layers"]
tokens = torch.cat([F.interpolate(maps[n].float(), size=(14, 14), mode="bilinear", align_corners=False)
                    for n in layers], 1).flatten(2).transpose(1, 2).half().float()   # (M, 196, 192): UniAD quick
index = defaultdict(lambda: defaultdict(list))
for i, (c, s, _d, _p) in enumerate(items):
    index[c][s].append(i)
all_train = [i for c in index for i in index[c]["train"]]
global_mean = tokens[all_train].mean(0)   # (196, 192)
print("| class | train err, class mean | train err, all-class mean | token norm | image AUROC, class mean | image AUROC, all-class mean |")
print("|---|---:|---:|---:|---:|---:|")
for c in index:
    train, test = tokens[index[c]["train"]], tokens[index[c]["test"]]
    labels = [int(items[i][2] != "good") for i in index[c]["test"]]
    row = []
    for mean in (train.mean(0), global_mean):
        row.append(float((train - mean).norm(dim=-1).mean()))
    aucs = [100 * roc_auc_score(labels, image_score_from_map(grid_to_image((test - mean).norm(dim=-1)).numpy()))
            for mean in (train.mean(0), global_mean)]
    print(f"| {c} | {row[0]:.2f} | {row[1]:.2f} | {float(train.norm(dim=-1).mean()):.2f} | {aucs[0]:.1f} | {aucs[1]:.1f} |")
