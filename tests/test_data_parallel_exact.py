"""Data-parallel training is exact: 2 processes (gloo) with batch B/2 each give the weights of 1 process with batch B.

Both detectors train on features gathered on every rank, draw one batch order per epoch shared by
all ranks and take interleaved slices of each global batch; the per-rank losses are weighted so
that the averaged gradient is the one-process gradient even for an uneven last batch (11 images,
global batch 8). Per-rank noise (dropout, jitter, sampled latents) is turned off, as it must be
for the comparison. Tolerance: float32 reduction order differs (sum of two halves vs one sum).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("distributed_fit.py")
TOLERANCE = 1e-5  # absolute, on weights of order 0.1–1 after a few Adam steps of 1e-3
# LTAD's decoder convolutions feed GroupNorm, which removes most of what their biases do: those biases get
# gradients near the rounding level, and Adam (step ≈ lr · g / |g|) turns rounding noise into steps of order
# lr. They are left out of the weight comparison; the decoder is still checked through the phase-1 losses.
NEAR_ZERO_GRADIENT = ("decoder.stages.", ".bias")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fit(launcher: list[str], model: str, batch: int, out: Path) -> tuple[dict[str, torch.Tensor], object]:
    out.mkdir(parents=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([*launcher, str(SCRIPT), model, str(batch), str(out)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out / "weights.safetensors")), json.loads((out / "losses.json").read_text())


@pytest.mark.parametrize("model", ["uniad", "ltad"])
def test_two_processes_train_the_weights_of_one_process_with_the_same_global_batch(model, tmp_path):
    one, one_losses = _fit([sys.executable], model, 8, tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    two, two_losses = _fit(torchrun, model, 4, tmp_path / "two")
    assert one.keys() == two.keys()
    compared = [k for k in one if not (k.startswith(NEAR_ZERO_GRADIENT[0]) and k.endswith(NEAR_ZERO_GRADIENT[1]))]
    assert len(compared) >= 0.8 * len(one)  # only those biases are left out
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in compared)
    print(f"{model}: max |w1 - w2| = {worst:.2e}; losses 1 process {one_losses}, 2 processes {two_losses}")
    assert worst <= TOLERANCE, worst
    flat_one = one_losses if isinstance(one_losses, list) else [x for v in one_losses.values() for x in v]
    flat_two = two_losses if isinstance(two_losses, list) else [x for v in two_losses.values() for x in v]
    assert len(flat_one) >= 3 and flat_one == pytest.approx(flat_two, rel=1e-5)  # epoch losses over all ranks
