"""`ltbench.distributed.average_gradients` in two real gloo processes against one process on the combined batch.

Each rank holds the same `nn.Linear`, takes the mean-squared error on its half of a batch,
averages gradients and takes one SGD step. With equal halves the mean of the two half-batch
gradients is the gradient of the whole batch, so both ranks must end with the weights one
process reaches on the combined batch (to float rounding: the sum over ranks is reduced in
another order).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch
from torch import nn

BATCH = 8       # combined batch; each of the 2 ranks takes half
LR = 0.5        # large enough that a step moves the weights far beyond float rounding
TOLERANCE = 1e-6


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(BATCH, 3) inputs and (BATCH, 2) targets; the halves differ, so their gradients do."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCH, 3, generator=generator)
    inputs[BATCH // 2:] += 2.0
    return inputs, torch.randn(BATCH, 2, generator=generator)


def fresh_linear() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(3, 2)


def one_step(inputs: torch.Tensor, targets: torch.Tensor, synchronise) -> nn.Linear:
    """One SGD step of a fresh `nn.Linear` on (inputs, targets); `synchronise(parameters)` runs before the step."""
    model = fresh_linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    nn.functional.mse_loss(model(inputs), targets).backward()
    synchronise(model.parameters())
    optimizer.step()
    return model


def rank_step(rank: int, store_file: str, out_dir: str) -> None:
    """One rank: join a 2-process gloo group, step on its half with averaged gradients, save its weights."""
    import torch.distributed as dist

    from ltbench import distributed

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        inputs, targets = batch()
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        model = one_step(inputs[half], targets[half], distributed.average_gradients)
        torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_reach_the_weights_of_one_process_on_the_combined_batch(tmp_path):
    # the references first: an optimizer's first step imports much of torch, better once here than in each rank
    inputs, targets = batch()
    combined = one_step(inputs, targets, lambda parameters: None).state_dict()
    alone = one_step(inputs[:BATCH // 2], targets[:BATCH // 2], lambda parameters: None).state_dict()
    start = fresh_linear().state_dict()
    # fork: the ranks start from this interpreter's imports (a spawned one re-imports torch, seconds per rank);
    # each rank builds its own process group, as under torchrun
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=rank_step, args=(rank, str(tmp_path / "store"), str(tmp_path)))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, expected in combined.items():
        # the step matters and the halves disagree: without averaging, rank 0 would end elsewhere
        assert (expected - start[name]).abs().max() > 0.05, name
        assert (expected - alone[name]).abs().max() > 0.05, name
        for rank in ranks:
            assert torch.allclose(rank[name], expected, atol=TOLERANCE, rtol=0), (name, rank[name], expected)
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks stay in step exactly
