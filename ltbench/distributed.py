"""Multi-process training under `torchrun` / `accelerate launch` (single or multi node).

Both launchers set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; when
`WORLD_SIZE` is absent or 1 everything here is a no-op, so the same code runs in one process.
Data is sharded like `torch.utils.data.DistributedSampler` (padded by wrapping around so every
rank sees the same number of batches), gradients are averaged over ranks after every backward
(DDP's synchronisation), predictions are gathered to rank 0, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ltbench.errors import RunError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0  # global rank, 0 … world_size − 1
    world_size: int = 1  # number of processes in the job
    local_rank: int = 0  # rank on this node (selects the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def info() -> DistInfo:
    """The current process's rank and world size (from the process group, else the environment)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str | torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched with several processes; return (info, this rank's device).

    Parameters: device: "cpu" or "cuda"; with CUDA each process takes GPU `LOCAL_RANK`.
    Returns: the `DistInfo` and the device this process should use.
    """
    current = info()
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
        device = torch.device("cuda", current.local_rank)
        torch.cuda.set_device(device)
    if current.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info(), device


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard(indices: Sequence[int], rank: int | None = None, world_size: int | None = None) -> list[int]:
    """This rank's share of `indices`, padded by wrapping so all ranks get equally many.

    Parameters: indices: the full (already shuffled) order; rank / world_size default to `info()`.
    Returns: every `world_size`-th index starting at `rank`, as `DistributedSampler` does.
    """
    current = info()
    rank = current.rank if rank is None else rank
    world_size = current.world_size if world_size is None else world_size
    indices = list(indices)
    if world_size <= 1 or not indices:
        return indices
    total = -(-len(indices) // world_size) * world_size
    padded = indices + indices[: total - len(indices)] if total > len(indices) else indices
    while len(padded) < total:  # fewer items than ranks
        padded = padded + indices[: total - len(padded)]
    return padded[rank:total:world_size]


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of `parameters` over all ranks, as DDP does after each backward (no-op in one process).

    Detectors call it between `loss.backward()` and the optimizer step. Unlike wrapping a module
    in `DistributedDataParallel`, it also covers losses built from several sub-modules' methods
    (LTAD's phases), which DDP's forward hooks would not see. A parameter without a gradient
    counts as zero, so every rank reduces the same tensors in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world_size = dist.get_world_size()
    for parameter in parameters:
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad.div_(world_size)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (the tensor itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the object itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere; [obj] in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered
