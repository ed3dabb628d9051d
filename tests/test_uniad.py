"""UniAD baseline: the reconstruction transformer, its neighbour mask and jitter, and the detector."""

from __future__ import annotations

import pytest
import torch

from baselines.uniad.model import EncoderLayer, ReconstructionTransformer, feature_jitter, neighbor_mask

# ----------------------------------------------------------------------------- model


def brute_force_window(grid: int, size: int, row: int, col: int) -> torch.Tensor:
    """(grid, grid) bool: the size×size window around (row, col), clipped at the border."""
    window = torch.zeros(grid, grid, dtype=torch.bool)
    half = size // 2
    window[max(row - half, 0):row + half + 1, max(col - half, 0):col + half + 1] = True
    return window


def small_transformer(encoder_layers: int = 1, decoder_layers: int = 2, neighbor_size: int = 3):
    return ReconstructionTransformer(12, grid=8, hidden=32, heads=4, encoder_layers=encoder_layers,
                                     decoder_layers=decoder_layers, feedforward=64, dropout=0.0,
                                     neighbor_size=neighbor_size)


def test_reconstruction_keeps_token_shape_and_owns_one_query_per_decoder_layer():
    torch.manual_seed(0)
    model = small_transformer()
    tokens = torch.randn(3, 64, 12)
    assert model(tokens).shape == (3, 64, 12)
    queries = [layer.query.weight for layer in model.decoder]
    assert len(queries) == 2 and all(q.shape == (64, 32) for q in queries)
    assert queries[0].data_ptr() != queries[1].data_ptr()
    assert "attn_mask" not in model.state_dict()  # rebuilt from the config, never saved
    with pytest.raises(AssertionError, match="expected tokens"):
        model(torch.randn(3, 63, 12))


def test_official_sizes_by_default():
    model = ReconstructionTransformer(272)
    assert model.input_proj.weight.shape == (256, 272) and model.output_proj.weight.shape == (272, 256)
    assert len(model.encoder) == 4 and len(model.decoder) == 4
    assert model.encoder[0].self_attn.num_heads == 8
    assert model.encoder[0].feedforward.linear1.weight.shape == (1024, 256)
    assert model.pos_embed.row_embed.weight.shape == (14, 128)
    assert model.attn_mask.shape == (196, 196)


def test_neighbor_mask_bars_exactly_the_window_around_each_token():
    grid, size = 14, 7
    mask = neighbor_mask(grid, size)
    assert mask.shape == (196, 196) and mask.dtype == torch.bool
    for row, col in [(0, 0), (5, 5), (13, 2), (7, 13)]:
        expected = brute_force_window(grid, size, row, col).flatten()
        assert torch.equal(mask[row * grid + col], expected)
    assert mask.diagonal().all()  # a token never sees itself
    assert int(mask[0].sum()) == 16 and int(mask[5 * grid + 5].sum()) == 49
    assert (~mask).any(dim=1).all()  # every token still sees something


def input_gradient(model, tokens: torch.Tensor, index: int) -> torch.Tensor:
    """(N,) size of d output[index] / d input[j] for every token j."""
    tokens = tokens.clone().requires_grad_(True)
    output = model(tokens)[0, index]
    # a fixed random direction: a plain sum of a LayerNorm output would be constant
    (output * torch.randn(output.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return tokens.grad[0].abs().sum(-1)


def test_reconstruction_of_a_token_cannot_use_its_window_but_uses_everything_outside():
    # one decoder layer and no encoder: output i depends on input j only through masked attention
    torch.manual_seed(0)
    grid, size = 8, 3
    model = small_transformer(encoder_layers=0, decoder_layers=1).eval()
    tokens = torch.randn(1, grid * grid, 12)
    for row, col in [(0, 0), (4, 3), (7, 6)]:
        index = row * grid + col
        window = brute_force_window(grid, size, row, col).flatten()
        grad = input_gradient(model, tokens, index)
        assert grad[window].max() == 0
        assert (grad[~window] > 0).all()
    # control: without the mask the same token does depend on its neighbours
    unmasked = small_transformer(encoder_layers=0, decoder_layers=1, neighbor_size=0).eval()
    assert (input_gradient(unmasked, tokens, 4 * grid + 3)[brute_force_window(grid, size, 4, 3).flatten()] > 0).all()


def test_encoder_attention_skips_the_window_and_keeps_the_token_through_the_residual():
    torch.manual_seed(0)
    grid, size = 6, 3
    layer = EncoderLayer(hidden=16, heads=2, feedforward=32, dropout=0.0).eval()
    pos = torch.randn(grid * grid, 16)
    mask = neighbor_mask(grid, size)
    x = torch.randn(1, grid * grid, 16)
    index = 2 * grid + 3
    grad = input_gradient(lambda t: layer(t, pos, mask), x, index)
    neighbours = mask[index].clone()
    neighbours[index] = False
    assert grad[neighbours].max() == 0 and grad[index] > 0 and (grad[~mask[index]] > 0).all()


def test_feature_jitter_scales_with_the_token_norm_and_is_seeded():
    tokens = torch.randn(4, 196, 64) * torch.linspace(0.5, 4, 196)[None, :, None]
    first = feature_jitter(tokens, generator=torch.Generator().manual_seed(1))
    again = feature_jitter(tokens, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    noise = first - tokens
    expected_std = tokens.norm(dim=-1) / 64 * 20.0  # (B, N)
    ratio = noise.std(dim=-1) / expected_std
    assert abs(ratio.mean().item() - 1.0) < 0.05
    assert torch.equal(feature_jitter(tokens, prob=0.0), tokens)
    assert torch.equal(feature_jitter(tokens, scale=0.0), tokens)
