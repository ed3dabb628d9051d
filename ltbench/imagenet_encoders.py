"""Frozen feature encoders on ImageNet weights: EfficientNet-B7 (transformers) and the torchvision CNNs.

`ltbench.backbones.create` builds them by name ("efficientnet-b7", "resnet18", "wide_resnet50_2",
"vgg16", each also as "NAME:/local/path"); the networks themselves and their weights are in
`ltbench.imagenet`. Every encoder takes RGB in [0, 1] and normalises with ImageNet's mean/std.

| name | layers (channels @ stride at 224) | embedding |
| --- | --- | --- |
| efficientnet-b7 | block3 32@2, block10 48@4, block17 80@8, block37 224@16 (ALIGN's blocks) | 2560, head conv mean |
| resnet18 | layer1 64@4, layer2 128@8, layer3 256@16 (layer4 512@32 on request) | 512, layer4 mean |
| wide_resnet50_2 | layer1 256@4, layer2 512@8, layer3 1024@16 (layer4 2048@32 on request) | 2048, layer4 mean |
| vgg16 | pool1 64@2, pool2 128@4, pool3 256@8, pool4 512@16, pool5 512@32 | 512, pool5 mean |
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ltbench.backbones import EfficientNetBlocksEncoder, ImageEncoder, checkpoint_folder
from ltbench.errors import BackboneError, WeightsMismatchError
from ltbench.imagenet import (
    IMAGENET_BUILDERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    STATS_KEY,
    ResNet,
    VGGFeatures,
    first_of,
    load_imagenet_weights,
)

if TYPE_CHECKING:
    from transformers import EfficientNetModel

EFFICIENTNET_B7 = "efficientnet-b7"
DEFAULT_EFFICIENTNET_SOURCE = "google/efficientnet-b7"  # ImageNet-1k, converted from keras (baselines.md Sec. 6)
# Maps kept by default: the layers the baselines read (baselines.md Sec. 3-5: RegAD ResNet-18 layer1-3,
# PatchCore WRN layer2-3, MKD VGG pool2-5) and the shallower ones issue 13 asks to expose.
DEFAULT_IMAGENET_LAYERS = {
    "resnet18": ("layer1", "layer2", "layer3"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
    "vgg16": ("pool1", "pool2", "pool3", "pool4", "pool5"),
}


class EfficientNetImageEncoder(EfficientNetBlocksEncoder):
    """transformers `EfficientNetModel` with ImageNet weights (`google/efficientnet-b7`), ImageNet mean/std.

    The same blocks as ALIGN's tower (for B7: block3, 10, 17, 37 = `hidden_states[4, 11, 18, 38]`);
    the embedding is the model's pooler output: the global average of the 1x1 head conv
    (`encoder.top_conv/top_bn/top_activation`, 2560-d for B7), i.e. what the ImageNet classifier reads.
    """

    pixel_mean = IMAGENET_MEAN
    pixel_std = IMAGENET_STD

    def __init__(self, model: EfficientNetModel, name: str = "efficientnet-b7",
                 device: torch.device | str = "cpu") -> None:
        super().__init__(model, name, device)

    def _embed_dim(self, config) -> int:
        return config.hidden_dim

    def _embed(self, last_block: Tensor) -> Tensor:
        encoder = self.module.encoder
        head = encoder.top_activation(encoder.top_bn(encoder.top_conv(last_block)))  # (B, hidden_dim, h, w)
        return head.mean(dim=(2, 3))


class TorchvisionImageEncoder(ImageEncoder):
    """A torchvision-layout ImageNet CNN (`ltbench.imagenet`), ImageNet mean/std, chosen stage outputs.

    ResNets offer "layer1".."layer4" (strides 4, 8, 16, 32), VGG-16 "pool1".."pool5" (2, 4, 8, 16,
    32). The embedding is the global average of the last stage (layer4 / pool5), i.e. what the
    ImageNet classifier reads (after its own pooling), whichever layers are kept as maps. The
    network given is frozen in place (eval mode, no gradients).
    """

    def __init__(self, name: str, network: ResNet | VGGFeatures, layers: Sequence[str] | None = None,
                 device: torch.device | str = "cpu") -> None:
        """name: the backbone name; layers: the maps to keep (default DEFAULT_IMAGENET_LAYERS[name], else all)."""
        if isinstance(network, ResNet):  # the stages it still has (a ResNet may be cut after layer3)
            names = [f"layer{k + 1}" for k in range(len(network.stage_channels))
                     if getattr(network, f"layer{k + 1}", None) is not None]
            offered = dict(zip(names, zip(network.stage_channels, (4, 8, 16, 32))))
        else:
            names = [f"pool{k + 1}" for k in range(len(network.pool_channels))]
            offered = dict(zip(names, zip(network.pool_channels, (2, 4, 8, 16, 32))))
        layers = list(layers if layers is not None else DEFAULT_IMAGENET_LAYERS.get(name, names))
        unknown = [layer for layer in layers if layer not in offered]
        if unknown or not layers or len(set(layers)) != len(layers):
            raise BackboneError(f"{name} has layers {', '.join(offered)}; got {layers}: give one or more of them, "
                                "each once")
        layers.sort(key=names.index)  # shallow to deep, as every encoder orders its maps
        self.last_layer = names[-1]
        super().__init__(name, network, layers, [offered[layer][0] for layer in layers], offered[names[-1]][0],
                         device, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
                         strides=[offered[layer][1] for layer in layers])

    def _forward(self, pixels: Tensor) -> tuple[list[Tensor], Tensor]:
        net = self.module
        stages = net.forward_features(pixels) if isinstance(net, ResNet) else net.forward_pools(pixels)
        return [stages[name] for name in self.layer_names], stages[self.last_layer].mean(dim=(2, 3))


def create_image_encoder(arch: str, source: str | None = None, layers: Sequence[str] | None = None,
                         device: torch.device | str = "cpu") -> ImageEncoder:
    """The image encoder of `ltbench.backbones.create(arch)` or `create(f"{arch}:{source}")`.

    Parameters: arch: "efficientnet-b7", "resnet18", "wide_resnet50_2" or "vgg16"; source: None for
    the Hub repository, else a local copy ("" is refused: nothing after the colon); layers: see
    `imagenet_encoder` (EfficientNet-B7's are fixed); device: where the encoder runs.
    """
    if arch == EFFICIENTNET_B7:
        if layers is not None:
            raise BackboneError(f"{arch} has fixed layers (ALIGN's blocks); layers can be chosen only for "
                                f"{', '.join(IMAGENET_BUILDERS)}")
        model = load_efficientnet(DEFAULT_EFFICIENTNET_SOURCE if source is None else source)
        return EfficientNetImageEncoder(model, name=arch, device=device)
    if arch not in IMAGENET_BUILDERS:
        raise BackboneError(f"unknown ImageNet backbone {arch!r}; known: {EFFICIENTNET_B7}, {', '.join(IMAGENET_BUILDERS)}")
    return imagenet_encoder(arch, source, layers, device)


def imagenet_encoder(arch: str, source: str | Path | None = None, layers: Sequence[str] | None = None,
                     device: torch.device | str = "cpu", width: int = 64) -> TorchvisionImageEncoder:
    """A frozen torchvision-layout CNN with its ImageNet weights, as `create(arch)` builds it.

    Parameters: arch: "resnet18", "wide_resnet50_2" or "vgg16"; source: None for the Hub repository
    (IMAGENET_WEIGHTS[arch].repo), else a `model.safetensors` file or a folder holding it; layers: the maps to
    keep, shallow to deep (default DEFAULT_IMAGENET_LAYERS[arch]); width: first-stage width of the network (64 for the real weights; tests use less).
    Raises: BackboneError (WeightsMismatchError for keys that do not fit) as `load_imagenet_weights`.
    """
    network = IMAGENET_BUILDERS[arch](width=width)
    load_imagenet_weights(network, source, arch)
    return TorchvisionImageEncoder(arch, network, layers, device)


def load_efficientnet(source: str = DEFAULT_EFFICIENTNET_SOURCE) -> EfficientNetModel:
    """Load a transformers `EfficientNetModel` (ImageNet classifier checkpoints too: the head is dropped).

    Parameters: source: a Hugging Face repo id (default google/efficientnet-b7) or a local folder from
    `save_pretrained` / `hf download`.
    Raises: BackboneError saying how to point at a local copy when the weights cannot be loaded;
    WeightsMismatchError when the checkpoint misses one of the model's weights or has a key other
    than the classifier head.
    """
    hint = (f"download the weights once (`hf download {DEFAULT_EFFICIENTNET_SOURCE} --local-dir "
            "/path/to/efficientnet-b7`) and pass `--set backbone=efficientnet-b7:/path/to/efficientnet-b7` "
            "(in Python: ltbench.backbones.create('efficientnet-b7:/path/to/efficientnet-b7'))")
    where, is_local = checkpoint_folder(source, DEFAULT_EFFICIENTNET_SOURCE, EFFICIENTNET_B7, hint)
    from transformers import EfficientNetModel

    try:
        model, info = EfficientNetModel.from_pretrained(where, local_files_only=is_local, output_loading_info=True)
    except Exception as exc:  # hub, network, file and size-mismatch errors: one actionable message
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BackboneError(f"could not load EfficientNet from {where!r} ({type(exc).__name__}: {first_line}); "
                            f"{hint}") from exc
    # from_pretrained only warns about keys that do not fit and leaves missing weights random: refuse instead
    problems = ([f"missing key {k!r}" for k in info["missing_keys"] if not k.endswith(STATS_KEY)]
                + [f"unexpected key {k!r}" for k in info["unexpected_keys"]
                   if not k.startswith(("classifier.", "efficientnet.classifier."))]
                + [f"key {item[0]!r} has another shape" for item in info.get("mismatched_keys", [])])
    if problems:
        raise WeightsMismatchError(f"{where} does not fit EfficientNetModel: {first_of(problems)}; {hint}")
    return model
