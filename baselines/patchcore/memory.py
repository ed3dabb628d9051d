"""PatchCore's pure-torch pieces: locally aware patch features, greedy coreset, nearest-neighbour scores.

Each follows amazon-science/patchcore-inspection `fcaa92f` (notes/baselines.md section 5, traps 12-14):
- `patch_embeddings`: `PatchMaker.patchify` (3×3 `Unfold`, zero padding), deeper grids upsampled
  bilinearly to the first layer's grid after unfolding, `MeanMapper` (adaptive average pooling of each
  layer's flattened C×3×3 to `pretrain_dim`) and `Aggregator` (the stacked layers pooled to `target_dim`);
- `greedy_coreset`: `ApproximateGreedyCoresetSampler` (Euclidean distances in a random 128-d projection,
  start points not in the coreset, the initial distance the mean over them) in O(N) memory per step;
- `nearest_distances`: faiss `IndexFlatL2` (squared L2) as an exact chunked search that never holds more
  than `CHUNK_ELEMENTS` distances at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

CHUNK_ELEMENTS = 1 << 24  # distances held at once in the nearest-neighbour search (64 MiB of float32)


def patch_embeddings(maps: Sequence[Tensor], pretrain_dim: int, target_dim: int, patch_size: int = 3) -> Tensor:
    """Locally aggregated patch features of several layers on the first layer's grid.

    Parameters: maps: per layer (B, C_l, H_l, W_l), shallow to deep (the first sets the grid H_0 × W_0);
    pretrain_dim: each layer's C_l·p² values are average-pooled to this size (official `MeanMapper`, 1024);
    target_dim: the stacked layers (L·pretrain_dim) are average-pooled to this size (`Aggregator`, 1024);
    patch_size: the neighbourhood p of `Unfold` (official 3, zero padding p // 2).
    Returns: (B, H_0·W_0, target_dim) float32, patches in row-major order.
    """
    height, width = maps[0].shape[-2:]
    pooled = []
    for layer in maps:
        batch, channels, h, w = layer.shape
        unfolded = F.unfold(layer.float(), kernel_size=patch_size, padding=patch_size // 2)  # (B, C·p², h·w), channel-major
        if (h, w) != (height, width):  # upsampled after unfolding, as `_embed` does for layer3
            grid = unfolded.view(batch, channels * patch_size ** 2, h, w)
            grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
            unfolded = grid.flatten(2)  # (B, C·p², H_0·W_0)
        patches = unfolded.transpose(1, 2).reshape(-1, 1, channels * patch_size ** 2)  # (B·N, 1, C·p²)
        pooled.append(F.adaptive_avg_pool1d(patches, pretrain_dim))  # (B·N, 1, pretrain_dim)
    stacked = torch.cat(pooled, dim=2)  # (B·N, 1, L·pretrain_dim): layer-major, as the official stack + reshape
    return F.adaptive_avg_pool1d(stacked, target_dim).view(maps[0].shape[0], height * width, target_dim)


def random_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> Tensor:
    """The coreset's random projection: `nn.Linear(dim_in, dim_out, bias=False)`'s default init (trap 14).

    Kaiming-uniform with a = √5 is U(−1/√dim_in, 1/√dim_in). Returns: (dim_out, dim_in) float32 weights (y = x Wᵀ).
    """
    bound = 1.0 / dim_in ** 0.5
    return torch.empty(dim_out, dim_in).uniform_(-bound, bound, generator=generator)


def draw_starts(count: int, starts: int, generator: torch.Generator) -> Tensor:
    """`min(starts, count)` distinct random indices in [0, count) (official `np.random.choice(..., replace=False)`)."""
    return torch.randperm(count, generator=generator)[:min(starts, count)]


def _euclidean_to(features: Tensor, squared_norms: Tensor, points: Tensor) -> Tensor:
    """(N, P) Euclidean distances from every row of `features` (N, d) to `points` (P, d), as the official
    `_compute_batchwise_differences`: sqrt(clamp(|a|² + |b|² − 2a·b, 0))."""
    products = features @ points.T  # (N, P)
    return (squared_norms[:, None] + (points * points).sum(1)[None, :] - 2 * products).clamp_min(0).sqrt()


def greedy_coreset(projected: Tensor, count: int, starts: Tensor, progress: bool = False) -> Tensor:
    """Indices of the approximate greedy coreset (official `ApproximateGreedyCoresetSampler`).

    The distance of each point to the coreset starts as its mean distance to the start points (which
    are not added); each step adds the point farthest from the coreset and lowers every distance by
    the new point's. Memory is O(N): one distance vector, never an N × N matrix.
    Parameters: projected: (N, d) features (the random projection of the patch features), on the
    device to work on; count: coreset size (≤ N); starts: (S,) start indices (`draw_starts`).
    Returns: (count,) int64 indices on the CPU, in the order chosen.
    """
    squared_norms = (projected * projected).sum(1)  # (N,)
    distances = _euclidean_to(projected, squared_norms, projected[starts.to(projected.device)]).mean(1)  # (N,)
    chosen = torch.empty(count, dtype=torch.int64)
    for step in tqdm(range(count), desc="patchcore coreset", unit="pt", leave=False, disable=not progress):
        index = int(torch.argmax(distances))
        chosen[step] = index
        new = _euclidean_to(projected, squared_norms, projected[index:index + 1])[:, 0]  # (N,)
        distances = torch.minimum(distances, new)
    return chosen


def nearest_distances(queries: Tensor, bank: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours in squared L2 (faiss `IndexFlatL2`), in chunks of bounded size.

    Parameters: queries: (Q, D); bank: (M, D) on the same device; k: neighbours (≤ M).
    Returns: (distances (Q, k) ascending squared L2, indices (Q, k) int64 into the bank), on that device.
    """
    k = min(k, len(bank))
    bank_norms = (bank * bank).sum(1)  # (M,)
    bank_chunk = max(k, min(len(bank), CHUNK_ELEMENTS // 1024))
    query_chunk = max(1, CHUNK_ELEMENTS // bank_chunk)
    out_distances = torch.empty(len(queries), k, device=queries.device, dtype=queries.dtype)
    out_indices = torch.empty(len(queries), k, device=queries.device, dtype=torch.int64)
    for q in range(0, len(queries), query_chunk):
        block = queries[q:q + query_chunk]  # (q, D)
        block_norms = (block * block).sum(1)[:, None]  # (q, 1)
        best_d = best_i = None
        for b in range(0, len(bank), bank_chunk):
            rows = bank[b:b + bank_chunk]
            d = (block_norms + bank_norms[None, b:b + bank_chunk] - 2 * block @ rows.T).clamp_min(0)  # (q, m)
            d, i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
            i = i + b
            if best_d is not None:
                d, pick = torch.topk(torch.cat([best_d, d], 1), k, dim=1, largest=False)
                i = torch.gather(torch.cat([best_i, i], 1), 1, pick)
            best_d, best_i = d, i
        out_distances[q:q + query_chunk], out_indices[q:q + query_chunk] = best_d, best_i
    return out_distances, out_indices
