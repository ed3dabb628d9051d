"""Sharding and single-process behaviour of ltbench.distributed."""

import torch

from ltbench import distributed


def test_shard_partitions_and_pads_like_distributed_sampler():
    indices = list(range(10))
    shards = [distributed.shard(indices, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # ceil(10 / 3), padded by wrapping
    assert sorted(i for s in shards for i in s) == sorted(indices + [0, 1])
    sampler = torch.utils.data.DistributedSampler(range(10), num_replicas=3, rank=1, shuffle=False)
    assert distributed.shard(indices, 1, 3) == list(sampler)


def test_shard_with_fewer_items_than_ranks():
    shards = [distributed.shard([7, 8], rank, 4) for rank in range(4)]
    assert shards == [[7], [8], [7], [8]]


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    current, device = distributed.setup("cpu")
    assert (current.rank, current.world_size, current.is_main, current.enabled) == (0, 1, True, False)
    assert device == torch.device("cpu")
    module = torch.nn.Linear(2, 2)
    module(torch.ones(1, 2)).sum().backward()
    before = module.weight.grad.clone()
    distributed.average_gradients(module.parameters())
    assert torch.equal(module.weight.grad, before)
    assert torch.equal(distributed.all_reduce_sum(torch.tensor([1, 2])), torch.tensor([1, 2]))
    assert distributed.gather_to_main(3) == [3] and distributed.broadcast("x") == "x"
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]
