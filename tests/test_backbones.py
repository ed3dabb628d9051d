"""Backbones: layer names, shapes and strides; real lite weights; soft prompts; the ALIGN loading paths."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the network

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from ltbench import backbones
from ltbench.errors import BackboneError

CAT_CLASSES = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def tiny():
    return backbones.create("tiny-align")


@pytest.fixture(scope="module")
def lite():
    return backbones.create("lite")


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def assert_layout(encoder, names, channels, strides, embed_dim, batch=2):
    assert encoder.layer_names == names
    assert encoder.channels == dict(zip(names, channels))
    assert encoder.strides == dict(zip(names, strides))
    assert encoder.embed_dim == embed_dim and encoder.input_size == 224
    features = encoder.encode_image(images(batch))
    assert list(features.maps) == names
    for name, c, s in zip(names, channels, strides):
        assert features.maps[name].shape == (batch, c, 224 // s, 224 // s), name
        assert features.maps[name].dtype == torch.float32 and not features.maps[name].requires_grad
    assert features.embedding.shape == (batch, embed_dim)


def test_layer_rule_gives_the_paper_align_layers():
    from transformers import AlignVisionConfig

    config = AlignVisionConfig()  # EfficientNet-B7, as in kakaobrain/align-base
    repeats = [math.ceil(config.depth_coefficient * n) for n in config.num_block_repeats]
    assert repeats == [4, 7, 7, 10, 10, 13, 4]
    blocks = backbones.last_block_per_stride(repeats, config.strides)
    assert tuple(blocks) == backbones.ALIGN_PAPER_BLOCKS == (3, 10, 17, 37)
    assert [b + backbones.HIDDEN_STATE_OFFSET for b in blocks] == [4, 11, 18, 38]


def test_full_size_align_vision_tower_layout():
    from transformers import AlignVisionConfig, AlignVisionModel

    encoder = backbones.AlignImageEncoder(AlignVisionModel(AlignVisionConfig()))  # random weights, no download
    assert encoder.hidden_state_indices == [4, 11, 18, 38]
    assert_layout(encoder, ["block3", "block10", "block17", "block37"], [32, 48, 80, 224], [2, 4, 8, 16], 640,
                  batch=1)


def test_tiny_align_layout_and_hidden_state_convention(tiny):
    encoder = tiny.image
    assert_layout(encoder, ["block0", "block1", "block2", "block4"], [8, 8, 16, 32], [2, 4, 8, 16], 80)
    # the maps are transformers' hidden_states[block + HIDDEN_STATE_OFFSET]; the embedding its pooler output
    batch = images(2, seed=3)
    features = encoder.encode_image(batch)
    with torch.no_grad():
        reference = encoder.module((batch - 0.5) / 0.5, output_hidden_states=True)
    for name, index in zip(encoder.layer_names, encoder.hidden_state_indices):
        assert torch.equal(features.maps[name], reference.hidden_states[index])
    torch.testing.assert_close(features.embedding, reference.pooler_output)


def test_tiny_align_is_deterministic_and_leaves_the_global_rng_alone(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = backbones.create("tiny-align")
    assert torch.equal(torch.rand(3), expected)
    assert again.image.digest == tiny.image.digest
    batch = images(1, seed=5)
    assert torch.equal(again.image.encode_image(batch).embedding, tiny.image.encode_image(batch).embedding)


def test_lite_layout_and_real_imagenet_weights(lite):
    from skimage import data

    assert_layout(lite.image, ["block0", "block2", "block4", "block10"], [16, 24, 40, 112], [2, 4, 8, 16], 1280)
    cat = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float().div(255)[None]  # (1, 3, 300, 451)
    top5 = set(lite.image.classify(cat).topk(5).indices[0].tolist())
    assert top5 & CAT_CLASSES, f"top-5 ImageNet classes of a cat photo: {sorted(top5)}"


def test_input_contract_resizes_and_rejects_bad_shapes(tiny):
    small = images(1)[:, :, :112, :112]
    features = tiny.image.encode_image(small)
    assert features.maps["block4"].shape[-2:] == (14, 14)
    with pytest.raises(BackboneError, match=r"\(B, 3, H, W\)"):
        tiny.image.encode_image(torch.rand(3, 224, 224))


@pytest.mark.parametrize("name", ["tiny-align", "lite"])
def test_soft_prompts_from_words_equal_the_words_and_get_gradients(name, tiny, lite):
    text = {"tiny-align": tiny, "lite": lite}[name].text
    for prefix in ("a broken", ""):
        init = text.word_embeddings("object object")  # (K, token_dim)
        assert init.shape == (2, text.token_dim)
        soft = init[None].repeat(3, 1, 1).requires_grad_()
        encoded = text.encode_soft(prefix, soft)
        assert encoded.shape == (3, text.dim)
        expected = text.encode_text([f"{prefix} object object".strip()])
        torch.testing.assert_close(encoded, expected.expand(3, -1), atol=1e-5, rtol=1e-5)
        encoded[1].square().sum().backward()
        assert soft.grad[1].abs().sum() > 0 and soft.grad[0].abs().sum() == 0
    assert all(p.grad is None and not p.requires_grad for p in text.model.parameters())


def test_align_text_is_cls_through_the_projection(tiny):
    text = tiny.text
    assert (text.dim, text.token_dim) == (80, 32)
    prompts = ["a", "a broken object", "a photo of a zipper"]
    tokens = text.tokenizer(prompts, padding=True, return_tensors="pt")
    from transformers import AlignModel

    model = AlignModel(backbones.build_tiny_align()[0].config)
    model.text_model, model.text_projection = text.model, text.projection
    with torch.no_grad():
        reference = model.get_text_features(**tokens).pooler_output
    torch.testing.assert_close(text.encode_text(prompts), reference)


def test_lite_text_padding_is_masked_and_meaning_survives(lite):
    text = lite.text
    assert (text.dim, text.token_dim) == (384, 384)
    prompts = ["a photo of a cat", "a picture of a kitten", "a broken screw"]
    together = text.encode_text(prompts)
    alone = torch.cat([text.encode_text([p]) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    unit = F.normalize(together, dim=-1)  # encode_text leaves normalisation to the caller
    assert not torch.allclose(together.norm(dim=-1), torch.ones(3))
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.3


def test_to_patch_tokens_resizes_and_concatenates_in_layer_order():
    maps = OrderedDict([("a", torch.rand(2, 3, 56, 56)), ("b", torch.rand(2, 5, 14, 14)), ("c", torch.rand(2, 4, 7, 7))])
    tokens = backbones.to_patch_tokens(maps)
    assert tokens.shape == (2, 12, 14, 14)
    torch.testing.assert_close(tokens[:, :3], F.interpolate(maps["a"], size=(14, 14), mode="bilinear",
                                                            align_corners=False))
    assert torch.equal(tokens[:, 3:8], maps["b"])
    assert backbones.to_patch_tokens(maps, grid=7)[:, 8:].equal(maps["c"])


def test_unknown_names_and_missing_align_weights_are_clear_errors(tmp_path):
    with pytest.raises(BackboneError, match="known: align, lite, tiny-align, efficientnet-b7, resnet18, wide_resnet50_2, vgg16"):
        backbones.create("resnet50")
    with pytest.raises(BackboneError, match="--backbone align:/path/to/align-base"):
        backbones.create(f"align:{tmp_path / 'missing'}")
    with pytest.raises(BackboneError, match="--backbone align:"):
        backbones.create("align:")


def test_align_loads_from_a_local_folder(tmp_path, tiny):
    model, tokenizer = backbones.build_tiny_align()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    local = backbones.create(f"align:{tmp_path}")
    assert local.name == "align" and local.image.layer_names == tiny.image.layer_names
    batch = images(1, seed=9)
    torch.testing.assert_close(local.image.encode_image(batch).embedding, tiny.image.encode_image(batch).embedding)
    torch.testing.assert_close(local.text.encode_text(["a broken object"]), tiny.text.encode_text(["a broken object"]))
