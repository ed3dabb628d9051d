"""Fit one detector on a tiny in-memory set, in one process or under torchrun, and save rank 0's weights.

Used by `test_data_parallel_exact.py`: `python tests/distributed_fit.py MODEL BATCH OUT` (one process)
or the same under `python -m torch.distributed.run --nproc_per_node 2` (global batch = BATCH × 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ltbench import distributed
from ltbench.detector import get_detector_class, make_config
from ltbench.testing import TensorTrainSet, pattern_images

# no per-rank noise: no dropout, no jitter, no sampled latents or synthetic features
SETTINGS = {
    "uniad": {"backbone": "tiny-align", "hidden": 16, "heads": 2, "encoder_layers": 1, "decoder_layers": 1,
              "feedforward": 32, "dropout": 0.0, "jitter_scale": 0.0, "epochs": 3, "lr": 1e-3},
    "ltad": {"backbone": "tiny-align", "rm_hidden": 16, "rm_heads": 2, "rm_encoder_layers": 1, "rm_decoder_layers": 1,
             "rm_feedforward": 32, "rm_dropout": 0.0, "jitter_scale": 0.0, "augmentation": "ae",
             "real_probability": 1.0, "epochs_phase1": 2, "epochs_phase2": 2, "lr": 1e-3},
}
IMAGES_PER_CLASS = (6, 5)  # 11 images: the last global batch is uneven across two ranks


def main(model: str, batch_size: int, out: Path) -> None:
    distributed.setup("cpu")
    torch.set_num_threads(1)
    images, class_idx = pattern_images(n_classes=2, per_class=max(IMAGES_PER_CLASS), seed=0)
    keep = torch.cat([torch.nonzero(class_idx == c)[:n, 0] for c, n in enumerate(IMAGES_PER_CLASS)])
    train = TensorTrainSet(images[keep], class_idx[keep], ["a", "b"], out / f"checkpoints-{distributed.info().rank}")
    cls = get_detector_class(model)
    detector = cls(make_config(cls.Config, {**SETTINGS[model], "batch_size": batch_size})).fit(train)
    if distributed.info().is_main:
        state = {k: v.detach().contiguous() for k, v in detector.module_.state_dict().items()}
        save_file(state, str(out / "weights.safetensors"))
        losses = detector.loss_history_
        (out / "losses.json").write_text(json.dumps(losses))
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
