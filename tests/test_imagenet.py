"""ImageNet backbones: torchvision-layout networks, strict loading of the Hub's safetensors, the encoders.

Real-size architectures are checked on the meta device (shapes without arithmetic); the arithmetic
is checked on narrow copies against a functional re-implementation written from torchvision's
definitions. Weights files are written in the Hub's format (timm's key names) with random values
and loaded through the code a user's download takes (`huggingface_hub.hf_hub_download` is pointed at
them), so nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the network

from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ltbench import backbones, imagenet
from ltbench.errors import BackboneError, LTBenchError, WeightsMismatchError
from ltbench.feature_cache import FeatureCache
from ltbench.imagenet_encoders import EfficientNetImageEncoder, TorchvisionImageEncoder, imagenet_encoder

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = 8  # first-stage width of the narrow test networks (64 in the real ones)

# name -> (layers, channels, strides, embed_dim) at 224, from issue 13 and torchvision's architectures
LAYOUTS = {
    "resnet18": (["layer1", "layer2", "layer3"], [64, 128, 256], [4, 8, 16], 512),
    "wide_resnet50_2": (["layer1", "layer2", "layer3"], [256, 512, 1024], [4, 8, 16], 2048),
    "vgg16": (["pool1", "pool2", "pool3", "pool4", "pool5"], [64, 128, 256, 512, 512], [2, 4, 8, 16, 32], 512),
    "efficientnet-b7": (["block3", "block10", "block17", "block37"], [32, 48, 80, 224], [2, 4, 8, 16], 2560),
}
# parameter counts torchvision documents for these models (resnet18 11.7M, wide_resnet50_2 68.9M; VGG-16's
# convolutional part is its 138.4M minus the classifier's 123.6M)
PARAMETERS = {"resnet18": 11_689_512, "wide_resnet50_2": 68_883_240, "vgg16": 14_714_688}


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ independent references
def _bn(x, state, prefix):
    return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                        state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-5)


def reference_resnet(state, x):
    """torchvision's ResNet forward written out with functional ops: the four stage outputs."""
    bottleneck = "layer1.0.conv3.weight" in state
    x = F.max_pool2d(F.relu(_bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), state, "bn1")), 3, 2, 1)
    stages = []
    for stage in range(1, 5):
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in state:
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            if bottleneck:  # stride on the 3x3 conv ("V1.5")
                out = F.relu(_bn(F.conv2d(x, state[f"{p}.conv1.weight"]), state, f"{p}.bn1"))
                out = F.relu(_bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), state, f"{p}.bn2"))
                out = _bn(F.conv2d(out, state[f"{p}.conv3.weight"]), state, f"{p}.bn3")
            else:
                out = F.relu(_bn(F.conv2d(x, state[f"{p}.conv1.weight"], stride=stride, padding=1), state, f"{p}.bn1"))
                out = _bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=1), state, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in state:
                x = _bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride), state, f"{p}.downsample.1")
            x = F.relu(out + x)
            block += 1
        stages.append(x)
    return stages


def reference_vgg(state, x):
    """torchvision's VGG-16 `features` written out: the five max-pool outputs."""
    pools, index = [], 0
    for item in imagenet.VGG16_CONFIG:
        if item == "M":
            x = F.max_pool2d(x, 2, 2)
            pools.append(x)
            index += 1
        else:
            x = F.relu(F.conv2d(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))
            index += 2
    return pools


# ------------------------------------------------------------------ files in the Hub's format
def randomised(state: dict, seed: int) -> dict:
    """Every float tensor redrawn at a scale that keeps activations O(1) through a deep net (He normal
    weights, BatchNorm weights near 1 and statistics away from 0/1, small biases), so that a wrong
    wiring or a skipped tensor shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        noise = torch.randn(value.shape, generator=generator) if value.is_floating_point() else None
        if noise is None:
            out[key] = value.clone()
        elif value.ndim > 1:
            out[key] = noise * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith("running_var"):
            out[key] = noise.abs() + 0.5
        elif key.endswith("weight"):
            out[key] = 1.0 + 0.1 * noise
        else:
            out[key] = 0.1 * noise
    return out


def write_weights(arch: str, path: Path, width: int = TINY, seed: int = 1, stats: bool = True) -> dict:
    """A `model.safetensors` as timm's `.tv_in1k` repositories hold it (random values); returns its tensors."""
    state = randomised(imagenet.IMAGENET_BUILDERS[arch](width=width, seed=seed).state_dict(), seed)
    if arch == "vgg16":  # timm keeps VGG's classifier as pre_logits (convs) and head.fc
        channels = state["features.28.weight"].shape[0]
        state |= {"pre_logits.fc1.weight": torch.randn(16, channels, 7, 7), "pre_logits.fc1.bias": torch.zeros(16),
                  "pre_logits.fc2.weight": torch.randn(16, 16, 1, 1), "pre_logits.fc2.bias": torch.zeros(16),
                  "head.fc.weight": torch.randn(1000, 16), "head.fc.bias": torch.zeros(1000)}
    if not stats:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Point `huggingface_hub.hf_hub_download` at local files; records the (repo, filename) asked for."""
    files, calls = {}, []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if repo_id not in files:
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id} is not in the cache and offline")
        return str(files[repo_id])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return files, calls


# ------------------------------------------------------------------ layouts at full size
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_full_size_layouts_channels_and_strides(name):
    layers, channels, strides, embed_dim = LAYOUTS[name]
    with torch.device("meta"):  # the real architecture, without allocating or computing anything
        if name == "efficientnet-b7":
            from transformers import EfficientNetConfig, EfficientNetModel

            encoder = EfficientNetImageEncoder(EfficientNetModel(EfficientNetConfig(depthwise_padding=[18])),
                                               device="meta")
        else:
            network = imagenet.IMAGENET_BUILDERS[name]()
            assert sum(p.numel() for p in network.parameters()) == PARAMETERS[name]
            encoder = TorchvisionImageEncoder(name, network, device="meta")
    assert encoder.layer_names == layers
    assert encoder.channels == dict(zip(layers, channels)) and encoder.strides == dict(zip(layers, strides))
    assert encoder.embed_dim == embed_dim and encoder.input_size == 224
    features = encoder.encode_image(images(1))
    assert {k: tuple(v.shape) for k, v in features.maps.items()} == {
        layer: (1, c, 224 // s, 224 // s) for layer, c, s in zip(layers, channels, strides)}
    assert tuple(features.embedding.shape) == (1, embed_dim)
    if name == "efficientnet-b7":
        assert encoder.hidden_state_indices == [4, 11, 18, 38]  # the same blocks as ALIGN (LTAD paper, Sec. 5)


def test_torchvision_key_names_and_shapes():
    with torch.device("meta"):
        resnet, wide, vgg = imagenet.resnet18(), imagenet.wide_resnet50_2(), imagenet.vgg16_features()
    shapes = {k: tuple(v.shape) for k, v in resnet.state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7) and shapes["fc.weight"] == (1000, 512)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1) and "layer1.0.downsample.0.weight" not in shapes
    assert shapes["layer4.1.bn2.running_var"] == (512,) and "layer1.0.bn1.num_batches_tracked" in shapes
    wide_shapes = {k: tuple(v.shape) for k, v in wide.state_dict().items()}
    assert wide_shapes["layer1.0.conv2.weight"] == (128, 128, 3, 3)  # bottlenecks twice as wide as ResNet-50's
    assert wide_shapes["layer4.2.conv3.weight"] == (2048, 1024, 1, 1) and wide_shapes["fc.weight"] == (1000, 2048)
    assert len([k for k in wide_shapes if k.endswith(".conv1.weight") and k.startswith("layer")]) == 16
    vgg_convs = sorted(int(k.split(".")[1]) for k in vgg.state_dict() if k.endswith(".weight"))
    assert vgg_convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's features.N indices
    assert vgg.pool_indices == list(imagenet.VGG16_POOL_INDICES) == [4, 9, 16, 23, 30]


# ------------------------------------------------------------------ loading through the download path
@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2", "vgg16"])
def test_hub_weights_load_and_the_encoder_matches_the_reference(arch, hub, fast_path):
    files, calls = hub
    repo = imagenet.IMAGENET_WEIGHTS[arch].repo
    files[repo] = fast_path / "model.safetensors"
    state = write_weights(arch, files[repo], stats=arch != "resnet18")  # with and without num_batches_tracked
    encoder = imagenet_encoder(arch, width=TINY)
    assert calls == [(repo, "model.safetensors")]
    loaded = encoder.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    batch = images(2, seed=4)
    features = encoder.encode_image(batch)
    normalised = (batch - MEAN) / STD
    with torch.no_grad():
        reference = reference_vgg(state, normalised) if arch == "vgg16" else reference_resnet(state, normalised)
    for layer in encoder.layer_names:
        index = int(layer[-1]) - 1
        torch.testing.assert_close(features.maps[layer], reference[index], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features.embedding, reference[-1].mean(dim=(2, 3)), atol=1e-4, rtol=1e-4)
    assert features.embedding.abs().mean() > 0.05 and features.embedding.isfinite().all()  # activations do not vanish
    assert not any(p.requires_grad for p in encoder.module.parameters()) and not encoder.module.training


def test_create_loads_a_full_size_local_folder(fast_path):
    folder = fast_path / "resnet18"
    state = write_weights("resnet18", folder / "model.safetensors", width=64)
    backbone = backbones.create(f"resnet18:{folder}")
    assert backbone.name == "resnet18" and backbone.image.layer_names == ["layer1", "layer2", "layer3"]
    loaded = backbone.image.module.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    maps = backbone.image.encode_image(images(1, seed=2)).maps
    assert [tuple(m.shape) for m in maps.values()] == [(1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14)]
    with pytest.raises(BackboneError, match="no text encoder"):
        _ = backbone.text


def test_a_local_file_and_its_folder_give_the_same_encoder(fast_path):
    write_weights("vgg16", fast_path / "model.safetensors")
    by_file = imagenet_encoder("vgg16", fast_path / "model.safetensors", layers=["pool2"], width=TINY)
    by_folder = imagenet_encoder("vgg16", str(fast_path), layers=["pool2"], width=TINY)
    assert by_file.digest == by_folder.digest and by_file.layer_names == ["pool2"]


def test_a_wrong_key_or_shape_is_refused_naming_the_file_and_the_key(fast_path):
    path = fast_path / "model.safetensors"
    state = write_weights("resnet18", path)
    renamed = dict(state)
    renamed["layer1.0.conv9.weight"] = renamed.pop("layer1.0.conv1.weight")
    save_file(renamed, str(path))
    with pytest.raises(WeightsMismatchError) as caught:
        imagenet.load_imagenet_weights(imagenet.resnet18(width=TINY), path, "resnet18")
    message = str(caught.value)
    assert str(path) in message and "'layer1.0.conv1.weight'" in message and "(and 1 more)" in message
    assert "\n" not in message and isinstance(caught.value, LTBenchError)
    with pytest.raises(WeightsMismatchError, match=r"unexpected key 'layer1.0.conv9.weight'"):
        imagenet.load_imagenet_weights(imagenet.resnet18(width=TINY), path, "resnet18",
                                       ignore=["layer1.0.conv1."])
    # a network of another width: the first differing shape is named
    write_weights("resnet18", path, width=16)
    with pytest.raises(WeightsMismatchError, match=r"key 'bn1.bias' has shape \(16,\), the resnet18 module \(8,\)"):
        imagenet.load_imagenet_weights(imagenet.resnet18(width=TINY), path, "resnet18")
    # the weights of another architecture
    write_weights("vgg16", path)
    with pytest.raises(WeightsMismatchError, match="does not fit resnet18: missing key"):
        imagenet.load_imagenet_weights(imagenet.resnet18(width=TINY), path, "resnet18")
    path.write_bytes(b"PK\x03\x04 a torch.save zip, not safetensors")
    with pytest.raises(BackboneError, match="not a readable safetensors file"):
        imagenet.load_imagenet_weights(imagenet.resnet18(width=TINY), path, "resnet18")


def test_heads_are_left_over_but_removed_or_added_modules_must_be_named(fast_path):
    path = fast_path / "model.safetensors"
    write_weights("resnet18", path)
    network = imagenet.resnet18(width=TINY)
    del network.layer4, network.fc  # RegAD: ResNet-18 cut after layer3
    with pytest.raises(WeightsMismatchError, match="unexpected key 'layer4."):
        imagenet.load_imagenet_weights(network, path, "resnet18")
    imagenet.load_imagenet_weights(network, path, "resnet18", ignore=["layer4."])  # fc is a head: allowed
    batch = images(1)
    stages = network.forward_features(imagenet.imagenet_normalize(batch))  # the README's RegAD example
    assert list(stages) == ["layer1", "layer2", "layer3"] and stages["layer3"].shape == (1, 4 * TINY, 14, 14)
    torch.testing.assert_close(imagenet.imagenet_normalize(batch), (batch - MEAN) / STD)
    encoder = TorchvisionImageEncoder("cut-resnet18", network)  # an encoder over the cut network
    assert encoder.layer_names == ["layer1", "layer2", "layer3"] and encoder.embed_dim == 4 * TINY
    features = encoder.encode_image(batch)
    with torch.no_grad():  # the encoder put the network in eval mode: BatchNorm now uses its statistics
        reference = network.forward_features(imagenet.imagenet_normalize(batch))["layer3"]
    torch.testing.assert_close(features.embedding, reference.mean(dim=(2, 3)))
    network.stn1 = torch.nn.Linear(2, 2)  # a module the file does not have
    with pytest.raises(WeightsMismatchError, match="missing key 'stn1.bias'"):
        imagenet.load_imagenet_weights(network, path, "resnet18", ignore=["layer4."])
    imagenet.load_imagenet_weights(network, path, "resnet18", ignore=["layer4.", "stn1."])


def test_missing_weights_offline_say_what_to_download_and_how_to_pass_them(hub, tmp_path):
    with pytest.raises(BackboneError) as caught:
        backbones.create("wide_resnet50_2")
    message = str(caught.value)
    assert "timm/wide_resnet50_2.tv_in1k" in message and "model.safetensors" in message
    assert "backbone=wide_resnet50_2:DIR" in message and "LocalEntryNotFoundError" in message
    with pytest.raises(BackboneError, match=r"does not exist: no vgg16 weights there; download it once"):
        backbones.create(f"vgg16:{tmp_path / 'missing'}")
    with pytest.raises(BackboneError, match="needs a weights file or folder after the colon"):
        backbones.create("resnet18:")


def test_layer_choice_and_names(hub, fast_path):
    files, _ = hub
    files["timm/wide_resnet50_2.tv_in1k"] = fast_path / "model.safetensors"
    write_weights("wide_resnet50_2", files["timm/wide_resnet50_2.tv_in1k"])
    encoder = imagenet_encoder("wide_resnet50_2", layers=("layer3", "layer2"), width=TINY)
    assert encoder.layer_names == ["layer2", "layer3"]  # always shallow to deep
    assert encoder.strides == {"layer2": 8, "layer3": 16} and encoder.channels == {"layer2": 64, "layer3": 128}
    full = imagenet_encoder("wide_resnet50_2", width=TINY)
    assert full.digest != encoder.digest  # the layers are part of what a cached entry holds
    with pytest.raises(BackboneError, match="layer1, layer2, layer3, layer4; got \\['layer5'\\]"):
        imagenet_encoder("wide_resnet50_2", layers=["layer5"], width=TINY)
    with pytest.raises(BackboneError, match="layers can be chosen only for"):
        backbones.create("tiny-align", layers=["block0"])
    with pytest.raises(BackboneError, match="efficientnet-b7 has fixed layers"):
        backbones.create("efficientnet-b7", layers=["block3"])
    with pytest.raises(BackboneError, match="known: align, lite, tiny-align, efficientnet-b7, resnet18"):
        backbones.create("resnet50")


def test_digest_tells_random_from_loaded_weights_and_the_cache_keys_on_it(hub, fast_path):
    files, _ = hub
    files["timm/resnet18.tv_in1k"] = fast_path / "a" / "model.safetensors"
    write_weights("resnet18", files["timm/resnet18.tv_in1k"], seed=1)
    loaded = imagenet_encoder("resnet18", width=TINY)
    again = imagenet_encoder("resnet18", width=TINY)
    random = TorchvisionImageEncoder("resnet18", imagenet.resnet18(width=TINY, seed=1))
    assert loaded.digest == again.digest != random.digest
    write_weights("resnet18", fast_path / "b" / "model.safetensors", seed=2)
    other = imagenet_encoder("resnet18", fast_path / "b", width=TINY)
    assert other.digest != loaded.digest
    cache = FeatureCache(fast_path / "cache", progress=False)
    batch = images(2, seed=7)
    first = cache.encode(loaded, batch)
    second = cache.encode(again, batch)
    cache.encode(other, batch)
    assert (cache.hits, cache.misses) == (2, 4)
    assert all(torch.equal(first.maps[k], second.maps[k]) for k in first.maps)
    assert first.maps["layer1"].shape == (2, TINY, 56, 56)


def test_builders_are_trainable_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    one, two, three = imagenet.resnet18(width=TINY, seed=3), imagenet.resnet18(width=TINY, seed=3), \
        imagenet.resnet18(width=TINY, seed=4)
    assert torch.equal(torch.rand(2), expected)
    assert torch.equal(one.layer1[0].conv1.weight, two.layer1[0].conv1.weight)
    assert not torch.equal(one.layer1[0].conv1.weight, three.layer1[0].conv1.weight)
    assert one.training and all(p.requires_grad for p in one.parameters())
    logits = one(images(2))
    assert logits.shape == (2, 1000)
    logits.sum().backward()
    assert one.conv1.weight.grad is not None
    # torchvision's initialisation: Kaiming normal (fan_out) convs, unit BatchNorm
    weight = imagenet.vgg16_features(seed=0).features[28].weight
    assert abs(weight.std().item() - (2 / (512 * 9)) ** 0.5) < 1e-3 and torch.equal(one.bn1.weight, torch.ones(TINY))


# ------------------------------------------------------------------ EfficientNet-B7 (transformers)
def tiny_efficientnet(path: Path):
    """A narrow ImageNet-classifier checkpoint as google/efficientnet-b7 is saved (`save_pretrained`)."""
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    config = EfficientNetConfig(width_coefficient=0.25, depth_coefficient=1.0, num_block_repeats=[1] * 7,
                                hidden_dim=320, image_size=64, num_labels=10)
    model = EfficientNetForImageClassification(config)
    model.load_state_dict(randomised(model.state_dict(), seed=0))  # transformers' init makes activations vanish
    model.save_pretrained(path)
    return model


def test_efficientnet_b7_loads_a_local_checkpoint_and_matches_transformers(tmp_path):
    classifier = tiny_efficientnet(tmp_path / "b7").eval()
    backbone = backbones.create(f"efficientnet-b7:{tmp_path / 'b7'}")
    encoder = backbone.image
    assert backbone.name == "efficientnet-b7" and isinstance(encoder, EfficientNetImageEncoder)
    assert encoder.layer_names == ["block0", "block1", "block2", "block4"]
    assert encoder.channels == {"block0": 8, "block1": 8, "block2": 16, "block4": 32}
    assert list(encoder.strides.values()) == [2, 4, 8, 16] and encoder.embed_dim == 320
    batch = images(2, seed=6)
    features = encoder.encode_image(batch)
    with torch.no_grad():  # transformers' own forward of the saved model, ImageNet-normalised input
        reference = classifier.efficientnet((batch - MEAN) / STD, output_hidden_states=True)
    for name, index in zip(encoder.layer_names, encoder.hidden_state_indices):
        torch.testing.assert_close(features.maps[name], reference.hidden_states[index])
    torch.testing.assert_close(features.embedding, reference.pooler_output)
    assert features.embedding.abs().mean() > 0.05 and features.embedding.isfinite().all()  # activations do not vanish
    with pytest.raises(BackboneError, match="no text encoder"):
        _ = backbone.text


def test_efficientnet_b7_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    tiny_efficientnet(tmp_path / "b7")
    weights = tmp_path / "b7" / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("top_conv.weight"))
    state[key.replace("top_conv", "top_konv")] = state.pop(key)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match=r"does not fit EfficientNetModel: missing key '.*top_conv.weight'"):
        backbones.create(f"efficientnet-b7:{tmp_path / 'b7'}")
    with pytest.raises(BackboneError, match="not a checkpoint folder for `efficientnet-b7`.*efficientnet-b7:/path"):
        backbones.create(f"efficientnet-b7:{tmp_path / 'missing'}")
