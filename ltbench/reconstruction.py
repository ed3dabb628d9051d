"""UniAD's reconstruction transformer (You et al., NeurIPS 2022) and its feature jitter, pure torch.

Shared by the `uniad` baseline and LTAD's reconstruction module Π, so neither model package imports the other.

Data flow: feature tokens (B, N, C) --input projection--> (B, N, hidden) --encoder with
neighbour-masked self-attention--> memory --decoder whose layers each own a learnable query and
attend, neighbour-masked, to the memory and to the previous decoder output--> (B, N, hidden)
--output projection--> reconstruction (B, N, C).

Defaults follow the official code (zhiyuanyou/UniAD, experiments/MVTec-AD/config.yaml and
models/reconstructions/uniad.py; checked facts in notes/uniad.md). Feature jitter is a separate
function, applied by the training loop before `forward`, so that the module is deterministic
given its input and LTAD can reuse it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- helpers


def neighbor_mask(grid: int, size: int) -> Tensor:
    """Attention mask that bars every token from the size×size window around itself.

    Parameters: grid: side of the square token grid (N = grid²), tokens in row-major order;
    size: window side (odd; the window includes the token itself and is clipped at the border).
    Returns: (N, N) bool, True where query token i may NOT attend to key token j.
    """
    assert grid >= 1 and size >= 1, f"grid ({grid}) and neighbour size ({size}) must be positive"
    half = size // 2
    rows = torch.arange(grid).repeat_interleave(grid)  # (N,) row of each token
    cols = torch.arange(grid).repeat(grid)  # (N,) column of each token
    near_rows = (rows[:, None] - rows[None, :]).abs() <= half  # (N, N)
    near_cols = (cols[:, None] - cols[None, :]).abs() <= half  # (N, N)
    return near_rows & near_cols


def feature_jitter(
    tokens: Tensor, scale: float = 20.0, prob: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Add UniAD's feature jitter: noise ~ N(0, 1) · (‖token‖₂ / C) · scale, with probability `prob`.

    One coin decides for the whole batch, as in the official code.
    Parameters: tokens: (B, N, C) features; scale: noise scale (official 20); prob: probability
    of jittering the batch (official 1); generator: seeded source of randomness (its device
    is used for drawing; the noise is moved to the tokens' device).
    Returns: (B, N, C) jittered tokens (the input itself when the coin says no).
    """
    draw_device = generator.device if generator is not None else tokens.device
    if prob < 1.0 and torch.rand((), generator=generator, device=draw_device).item() >= prob:
        return tokens
    channels = tokens.shape[-1]
    norms = tokens.norm(dim=-1, keepdim=True) / channels  # (B, N, 1)
    noise = torch.randn(tokens.shape, generator=generator, device=draw_device, dtype=tokens.dtype)
    return tokens + noise.to(tokens.device) * norms * scale  # (B, N, C)


def transformer_problems(hidden: int, heads: int, encoder_layers: int, decoder_layers: int, feedforward: int,
                         dropout: float, neighbor_size: int, grid: int, prefix: str = "") -> list[str]:
    """What is wrong with a set of `ReconstructionTransformer` sizes, as messages naming the config fields.

    Parameters: the constructor's sizes; prefix: the config's field prefix (LTAD's "rm_", UniAD's "").
    Returns: one message per problem (empty when the sizes are valid).
    """
    problems = []
    if hidden < 2 or hidden % 2 or heads < 1 or hidden % heads:
        problems.append(f"{prefix}hidden ({hidden}) must be even and divisible by {prefix}heads ({heads})")
    if encoder_layers < 0 or decoder_layers < 1 or feedforward < 1:
        problems.append(f"{prefix}encoder_layers must be >= 0, {prefix}decoder_layers and {prefix}feedforward >= 1")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"{prefix}dropout must be in [0, 1), got {dropout}")
    if neighbor_size < 0 or (neighbor_size and (neighbor_size % 2 == 0 or neighbor_size >= grid)):
        problems.append(f"{prefix}neighbor_size must be 0 (no mask) or odd and < grid ({grid}), got {neighbor_size}")
    return problems


# ----------------------------------------------------------------------------- modules


class LearnedPositionEmbedding(nn.Module):
    """Absolute position embedding: a learned column half and a learned row half (hidden/2 each)."""

    def __init__(self, grid: int, hidden: int):
        super().__init__()
        assert hidden % 2 == 0, f"hidden size {hidden} must be even to split into row and column halves"
        self.grid = grid
        self.row_embed = nn.Embedding(grid, hidden // 2)
        self.col_embed = nn.Embedding(grid, hidden // 2)
        # uniform [0, 1), as the official PositionEmbeddingLearned
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> Tensor:
        index = torch.arange(self.grid, device=self.row_embed.weight.device)
        cols = self.col_embed(index)  # (W, hidden/2)
        rows = self.row_embed(index)  # (H, hidden/2)
        grid_cols = cols[None, :, :].expand(self.grid, -1, -1)  # (H, W, hidden/2)
        grid_rows = rows[:, None, :].expand(-1, self.grid, -1)  # (H, W, hidden/2)
        return torch.cat([grid_cols, grid_rows], dim=-1).flatten(0, 1)  # (N, hidden), row-major


class FeedForward(nn.Module):
    """Linear → ReLU → dropout → linear."""

    def __init__(self, hidden: int, feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(hidden, feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(feedforward, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))  # (B, N, hidden)


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: masked self-attention (position added to queries and keys), then FF."""

    def __init__(self, hidden: int, heads: int, feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.feedforward = FeedForward(hidden, feedforward, dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        # x: (B, N, hidden), pos: (N, hidden), mask: (N, N) bool, True = barred
        query_key = x + pos
        attended = self.self_attn(query_key, query_key, x, attn_mask=mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout1(attended))
        x = self.norm2(x + self.dropout2(self.feedforward(x)))
        return x  # (B, N, hidden)


class DecoderLayer(nn.Module):
    """Post-norm decoder layer with its own learnable query (the layer-wise query of UniAD).

    The query attends first to the encoder memory, then to the previous decoder output (the
    memory itself for the first layer); both attentions are neighbour-masked.
    """

    def __init__(self, tokens: int, hidden: int, heads: int, feedforward: int, dropout: float):
        super().__init__()
        self.query = nn.Embedding(tokens, hidden)  # (N, hidden), this layer's target
        self.memory_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.previous_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden)
        self.feedforward = FeedForward(hidden, feedforward, dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(hidden)

    def forward(self, previous: Tensor, memory: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        # previous, memory: (B, N, hidden); pos: (N, hidden); mask: (N, N) bool, True = barred
        target = self.query.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)  # (B, N, hidden)
        attended = self.memory_attn(target + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        target = self.norm1(target + self.dropout1(attended))
        attended = self.previous_attn(target + pos, previous + pos, previous, attn_mask=mask, need_weights=False)[0]
        target = self.norm2(target + self.dropout2(attended))
        target = self.norm3(target + self.dropout3(self.feedforward(target)))
        return target  # (B, N, hidden)


class ReconstructionTransformer(nn.Module):
    """UniAD's reconstruction network: (B, N, C) feature tokens → (B, N, C) reconstruction.

    Parameters: in_channels: C, the feature channels; grid: side of the token grid (N = grid²,
    row-major); hidden, heads, encoder_layers, decoder_layers, feedforward, dropout: transformer
    sizes (official: 256, 8, 4, 4, 1024, 0.1); neighbor_size: side of the barred attention
    window (official 7; 0 turns the mask off).

    Token standardisation (`standardize_with`): the network may see (tokens − μ) / σ and give back
    μ + σ ⊙ output, with μ, σ the per-channel mean and standard deviation of the training tokens,
    saved as buffers. The functions it can represent, its loss and its anomaly score are those of
    the official network (the affine maps fold into the input and output projections); what changes
    is the scale Adam works at. Raw `lite` tokens have norms near 75 and per-channel means of several
    units, while Adam moves each weight by about lr per step: with a few hundred steps (the CPU
    presets) the raw network does not even reach the per-position mean of its training tokens
    (bench/recon/README.md). μ = 0, σ = 1 (the default) is the official network, bit for bit.
    """

    def __init__(
        self,
        in_channels: int,
        grid: int = 14,
        hidden: int = 256,
        heads: int = 8,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        feedforward: int = 1024,
        dropout: float = 0.1,
        neighbor_size: int = 7,
    ):
        super().__init__()
        assert hidden % heads == 0, f"hidden size {hidden} must be divisible by the number of heads {heads}"
        assert decoder_layers >= 1, "the reconstruction needs at least one decoder layer"
        # a window covering the whole grid would leave some token nothing to attend to (NaN)
        assert neighbor_size == 0 or neighbor_size < grid, (
            f"neighbour window {neighbor_size} must be smaller than the token grid {grid} (or 0 for no mask)"
        )
        self.in_channels = in_channels
        self.grid = grid
        tokens = grid * grid
        self.input_proj = nn.Linear(in_channels, hidden)
        self.pos_embed = LearnedPositionEmbedding(grid, hidden)
        self.encoder = nn.ModuleList(EncoderLayer(hidden, heads, feedforward, dropout) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(tokens, hidden, heads, feedforward, dropout) for _ in range(decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden)
        self.output_proj = nn.Linear(hidden, in_channels)
        mask = neighbor_mask(grid, neighbor_size) if neighbor_size else None
        self.register_buffer("attn_mask", mask, persistent=False)  # (N, N) bool or None
        # token standardisation μ, σ (C,); identity until `standardize_with` (saved with the weights)
        self.register_buffer("token_mean", torch.zeros(in_channels))
        self.register_buffer("token_std", torch.ones(in_channels))
        # official initializer "xavier_uniform": every Linear (incl. attention output) xavier, bias 0;
        # attention input projections are xavier by MultiheadAttention's own init
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        _, count, channels = tokens.shape  # (B, N, C)
        assert count == self.grid * self.grid and channels == self.in_channels, (
            f"expected tokens (B, {self.grid * self.grid}, {self.in_channels}), got {tuple(tokens.shape)}"
        )
        x = self.input_proj((tokens - self.token_mean) / self.token_std)  # (B, N, hidden)
        pos = self.pos_embed()  # (N, hidden)
        for layer in self.encoder:
            x = layer(x, pos, self.attn_mask)  # (B, N, hidden)
        memory = x
        out = memory
        for layer in self.decoder:
            out = layer(out, memory, pos, self.attn_mask)  # (B, N, hidden)
        out = self.decoder_norm(out)
        return self.output_proj(out) * self.token_std + self.token_mean  # (B, N, C)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a model saved before token standardisation existed was trained without it: identity statistics, so that
        # it loads (strictly, every other key still checked) and predicts exactly as it did
        for name, fill in (("token_mean", torch.zeros_like), ("token_std", torch.ones_like)):
            state_dict.setdefault(prefix + name, fill(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def standardize_with(self, batches: Iterable[Tensor]) -> None:
        """Set μ, σ (per channel) from training tokens, given as batches (B, N, C) so that a large set needs no copy.

        Accumulates in float64; σ is floored at 1e-6 so that a constant channel passes through unchanged.
        """
        count, total, squares = 0, torch.zeros(self.in_channels, dtype=torch.float64), None
        for batch in batches:
            flat = batch.reshape(-1, self.in_channels).to("cpu", torch.float64)  # (B·N, C)
            count += flat.shape[0]
            total += flat.sum(0)
            squares = flat.pow(2).sum(0) if squares is None else squares + flat.pow(2).sum(0)
        if count < 2:
            raise ValueError(f"standardize_with needs at least 2 tokens, got {count}")
        mean = total / count
        variance = ((squares - count * mean.pow(2)) / (count - 1)).clamp_min(0.0)
        self.token_mean.copy_(mean.float())
        self.token_std.copy_(variance.sqrt().clamp_min(1e-6).float())
