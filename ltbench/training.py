"""What every trained detector's loop needs: seeds, epoch batches, the optimiser step, resumable state.

One home for the pieces each training loop would otherwise copy:
- `epoch_seed` / `rank_seed`: every epoch draws from its own seed, so a resumed run replays exactly
  what an uninterrupted one draws; under `torchrun` each rank draws its own noise.
- `EpochBatches`: one epoch's batch order, the same permutation on every rank. A global batch is
  `batch_size × world_size` items and each rank takes its interleaved slice (as
  `DistributedSampler`), so N processes with `batch_size = B / N` train exactly like one process
  with `batch_size = B` when the features are the same on every rank and there is no per-rank noise.
- `optimizer_step`: backward, gradients averaged over ranks, clipping, step.
- `adamw_step_decay`: AdamW with a StepLR drop (UniAD's and LTAD's optimiser).
- `TrainingProgress`: the training state kept in the checkpoint folder for `--resume`, refused when
  it was written by another config or split.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ltbench import distributed
from ltbench.detector import load_training_state, save_training_state
from ltbench.errors import DetectorError

SEED_MODULUS = 2**63  # torch generators take seeds below 2**64; keep a margin
EPOCH_STRIDE = 1_000_003  # a run's seed times a prime: the epochs of two seeds never share a seed
PHASE_STRIDE = 100_003  # separates the phases of a multi-phase schedule (LTAD's 1, 2 and the λ rule's 3)
RANK_STRIDE = 7_919  # separates the noise of the ranks of one epoch


def epoch_seed(seed: int, epoch: int, phase: int = 0) -> int:
    """The seed of one epoch (or one pass) of a run seeded `seed`; phases of a schedule do not collide."""
    return (seed * EPOCH_STRIDE + phase * PHASE_STRIDE + epoch) % SEED_MODULUS


def rank_seed(seed: int) -> int:
    """`seed` itself in one process and on rank 0; under torchrun each other rank gets its own seed."""
    return (seed + RANK_STRIDE * distributed.info().rank) % SEED_MODULUS


@dataclass(frozen=True)
class LocalBatch:
    """This rank's part of one global batch."""

    indices: Tensor  # (b,) int64, positions in the training set
    weight: float  # b · world_size / global batch size: scales a per-item mean loss so that averaged gradients equal one process's


def local_batch(global_batch: Tensor) -> LocalBatch:
    """This rank's interleaved slice of a global batch (as `DistributedSampler`), with its loss weight.

    For loops that build their own global batches (the same on every rank), e.g. RegAD's one-class batches.
    """
    current = distributed.info()
    local = global_batch[current.rank::current.world_size]
    return LocalBatch(local, len(local) * current.world_size / max(1, len(global_batch)))


class EpochBatches:
    """One epoch's batches for this rank, from one permutation shared by all ranks.

    Parameters: count: training items (the same on every rank); batch_size: items per rank and
    batch (the global batch is batch_size × world size); seed: the epoch's seed (`epoch_seed`).
    `noise` is the generator for everything else the epoch draws (jitter, sampling): on rank 0 it
    continues the permutation's stream (so a one-process run draws exactly as it always has), on
    other ranks it is seeded by `rank_seed(seed)`.
    """

    def __init__(self, count: int, batch_size: int, seed: int):
        if count < 1 or batch_size < 1:
            raise DetectorError(f"an epoch needs at least one item and batch_size >= 1; got {count} and {batch_size}")
        current = distributed.info()
        shared = torch.Generator().manual_seed(seed)
        order = torch.randperm(count, generator=shared)  # (count,), identical on every rank
        self.noise = shared if current.rank == 0 else torch.Generator().manual_seed(rank_seed(seed))
        step = batch_size * current.world_size
        self._batches = [local_batch(order[start:start + step]) for start in range(0, count, step)]

    def __iter__(self) -> Iterator[LocalBatch]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor | None, parts: Sequence[Sequence[nn.Parameter]],
                   grad_clip: float | None) -> None:
    """One optimiser step: backward, gradients averaged over ranks (no-op in one process), clipping, step.

    Parameters: loss: the (weighted) loss of this rank's batch, or None when this rank's slice of
    the global batch is empty (it still takes part in the gradient average, with zero gradients);
    parts: the learned parameters in groups, each clipped on its own (one group = one global norm,
    as UniAD's `clip_grad_norm_`; LTAD clips each part it trains with its own loss separately);
    grad_clip: the maximum gradient norm per part, or None for no clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    if loss is not None:
        loss.backward()
    distributed.average_gradients(p for params in parts for p in params)  # clip after averaging
    if grad_clip is not None:
        for params in parts:
            nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def adamw_step_decay(groups: Iterable[dict[str, Any]] | Iterable[nn.Parameter], lr: float, weight_decay: float,
                     epochs: int, drop_at: float, drop_factor: float
                     ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.StepLR]:
    """AdamW (β = 0.9, 0.999) and a StepLR that multiplies the rate by `drop_factor` every `drop_at · epochs` epochs.

    UniAD's official optimiser (config.yaml: AdamW, StepLR step 800 of 1000 epochs, γ 0.1); LTAD uses it too.
    `groups` may carry their own "weight_decay".
    """
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    step = max(1, round(drop_at * epochs))
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=drop_factor)


class TrainingProgress:
    """The resumable training state of one fit, kept in the run's checkpoint folder.

    Parameters: checkpoint_dir: `TrainSet.checkpoint_dir`; identity: what a state must agree on to be
    resumed (config and learned facts, as text; see `training_identity`).
    """

    def __init__(self, checkpoint_dir: Path, identity: str):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.identity = identity

    def save(self, modules: dict[str, nn.Module | torch.optim.Optimizer | Any], **values: Any) -> None:
        """Keep the state dicts of `modules` (models, optimisers, schedulers) and plain `values`, atomically (rank 0)."""
        state: dict[str, Any] = {"identity": self.identity, **values}
        for name, owner in modules.items():
            weights = owner.state_dict()
            if isinstance(owner, nn.Module):
                weights = {key: value.detach().cpu() for key, value in weights.items()}
            state[f"state:{name}"] = weights
        save_training_state(self.checkpoint_dir, state)

    def restore(self, modules: dict[str, nn.Module | torch.optim.Optimizer | Any]) -> dict[str, Any] | None:
        """Load a saved state into `modules` (those present in it) and return its plain values, or None when there is none.

        Raises `DetectorError` when the state was written by another config or split.
        """
        state = load_training_state(self.checkpoint_dir)
        if state is None:
            return None
        if not isinstance(state, dict) or state.get("identity") != self.identity:
            raise DetectorError(
                f"the training state in {self.checkpoint_dir} was written by another model, config or split; "
                "resume with the same config and split, or use a fresh checkpoint folder"
            )
        self.load_into(state, modules)
        return {key: value for key, value in state.items() if not key.startswith("state:") and key != "identity"}

    def peek(self) -> dict[str, Any] | None:
        """The saved state without loading it anywhere (checked like `restore`), or None."""
        state = load_training_state(self.checkpoint_dir)
        if state is not None and (not isinstance(state, dict) or state.get("identity") != self.identity):
            raise DetectorError(
                f"the training state in {self.checkpoint_dir} was written by another model, config or split; "
                "resume with the same config and split, or use a fresh checkpoint folder"
            )
        return state

    @staticmethod
    def load_into(state: dict[str, Any], modules: dict[str, Any]) -> None:
        """Load the saved state dicts of `state` into those `modules` it holds."""
        for name, owner in modules.items():
            key = f"state:{name}"
            if key in state:
                if isinstance(owner, nn.Module):
                    owner.load_state_dict(state[key], strict=True)
                else:
                    owner.load_state_dict(state[key])


def training_identity(config: Any, meta: Any) -> str:
    """What a checkpoint must agree on to be resumed: the config and the learned facts, as sorted JSON."""
    from ltbench.detector import config_to_dict

    return json.dumps({"config": config_to_dict(config), "meta": config_to_dict(meta)}, sort_keys=True, default=list)
