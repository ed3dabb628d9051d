"""ImageNet CNNs in plain PyTorch (no torchvision, no timm) and their original torchvision weights.

ResNet-18, Wide-ResNet-50-2 and the convolutional part of VGG-16, with torchvision's module names
(`conv1, bn1, layer1..4, fc`; `features.N`), so torchvision- and timm-format state dicts load as they
are. The weights are the original torchvision ImageNet-1k checkpoints as mirrored by timm on the
Hugging Face Hub (`model.safetensors`); `load_imagenet_weights` loads them with a strict key check.
The modules are ordinary trainable `nn.Module`s: baselines fine-tune (Cut & Paste, RegAD) or train
them; `ltbench.backbones` wraps them as frozen feature encoders.

Facts and sources: `/work/shared/notes/baselines.md` section 6 (which checkpoint each baseline's
official code loads, the Hub mirrors, the key names).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ltbench.errors import BackboneError, WeightsMismatchError

# torchvision's ImageNet normalisation of RGB in [0, 1] (the `transforms.Normalize` of its references)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "model.safetensors"  # the file name in every timm Hub repository
STATS_KEY = "num_batches_tracked"  # BatchNorm's step counter: never used in eval, absent from some files


@dataclass(frozen=True)
class ImageNetWeights:
    """Where the ImageNet weights of one architecture come from."""

    repo: str  # Hugging Face Hub repository holding `model.safetensors`
    original: str  # the torchvision checkpoint those tensors are (the file the baselines' official code loads)
    heads: tuple[str, ...]  # key prefixes of classifier heads, which a file may hold and a module may lack


# baselines.md section 6: `.tv_in1k` = the original torchvision weights; Wide-ResNet is V1, not `.tv2_in1k`.
# timm renames VGG's `classifier.0/3/6` to `pre_logits.fc1/fc2` and `head.fc`; both spellings are heads.
IMAGENET_WEIGHTS = {
    "resnet18": ImageNetWeights("timm/resnet18.tv_in1k", "resnet18-5c106cde.pth", ("fc.",)),
    "wide_resnet50_2": ImageNetWeights("timm/wide_resnet50_2.tv_in1k", "wide_resnet50_2-95faca4d.pth", ("fc.",)),
    "vgg16": ImageNetWeights("timm/vgg16.tv_in1k", "vgg16-397923af.pth", ("classifier.", "pre_logits.", "head.")),
}
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_POOL_INDICES = (4, 9, 16, 23, 30)  # `features[i]` of pool1..pool5 (MKD taps 9, 16, 23, 30: pool2..pool5)


def imagenet_normalize(images: Tensor) -> Tensor:
    """ImageNet normalisation, as the weights expect it.

    Parameters: images: (B, 3, H, W) float RGB in [0, 1].
    Returns: (B, 3, H, W) `(images - IMAGENET_MEAN) / IMAGENET_STD` per channel, same device and dtype.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


# ---------------------------------------------------------------------------------------------- ResNet
def _conv3x3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs and a shortcut (torchvision's `BasicBlock`)."""

    expansion = 1

    def __init__(self, inputs: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64) -> None:
        super().__init__()
        if width_per_group != 64:
            raise BackboneError(f"BasicBlock supports only width_per_group=64, got {width_per_group}")
        self.conv1 = _conv3x3(inputs, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50-style block, stride on the 3x3 conv (torchvision's "ResNet V1.5" `Bottleneck`).

    The inner width is planes * width_per_group / 64: 64 gives ResNet-50, 128 Wide-ResNet-50-2.
    """

    expansion = 4

    def __init__(self, inputs: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        self.conv1 = _conv1x1(inputs, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: stem (7x7/2 conv, 3x3/2 max-pool), four stages at strides 4, 8, 16, 32, `fc`.

    Parameters: block: BasicBlock or Bottleneck; blocks: blocks per stage; width: stem channels and
    planes of the first stage (64 in every ImageNet model; smaller only for tests); width_per_group:
    see Bottleneck; num_classes: outputs of `fc` (1000 for the ImageNet weights).
    Attributes: stage_channels: output channels of layer1..layer4.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: Sequence[int], width: int = 64,
                 width_per_group: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inputs = width
        self.stage_channels = []
        for stage, count in enumerate(blocks):
            planes, stride = width * 2 ** stage, 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or inputs != planes * block.expansion:
                downsample = nn.Sequential(_conv1x1(inputs, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(inputs, planes, stride, downsample, width_per_group)]
            inputs = planes * block.expansion
            layers += [block(inputs, planes, width_per_group=width_per_group) for _ in range(count - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            self.stage_channels.append(inputs)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inputs, num_classes)

    def forward_features(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Stage outputs of normalised images (B, 3, H, W): "layer1".."layer4", (B, C_k, H / 2^(k+1), W / 2^(k+1)).

        Stops at the first stage the module no longer has (e.g. after `del net.layer4`).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, width, H/4, W/4)
        stages = OrderedDict()
        for k in range(1, len(self.stage_channels) + 1):
            stage = getattr(self, f"layer{k}", None)
            if stage is None:
                break
            x = stage(x)
            stages[f"layer{k}"] = x
        return stages

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, num_classes) of normalised images (B, 3, H, W)."""
        last = next(reversed(self.forward_features(x).values()))
        return self.fc(torch.flatten(self.avgpool(last), 1))


# ---------------------------------------------------------------------------------------------- VGG
class VGGFeatures(nn.Module):
    """The convolutional part of torchvision's VGG (no batch norm): the module `features`, keys `features.N`.

    Parameters: config: channels per 3x3 conv and "M" for a 2x2/2 max-pool (torchvision's cfg "D" for
    VGG-16); width: channels of the first conv, the others scaled alike (64 = VGG-16; smaller for tests).
    Attributes: pool_indices: `features` index of each max-pool; pool_channels: channels at each pool.
    """

    def __init__(self, config: Sequence[int | str] = VGG16_CONFIG, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        inputs = 3
        self.pool_indices, self.pool_channels = [], []
        for item in config:
            if item == "M":
                self.pool_indices.append(len(layers))
                self.pool_channels.append(inputs)
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                outputs = int(item) * width // 64
                layers += [nn.Conv2d(inputs, outputs, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                inputs = outputs
        self.features = nn.Sequential(*layers)

    def forward_pools(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Max-pool outputs of normalised images (B, 3, H, W): "pool1".., (B, C_k, H / 2^k, W / 2^k)."""
        pools = OrderedDict()
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.pool_indices:
                pools[f"pool{len(pools) + 1}"] = x
        return pools

    def forward(self, x: Tensor) -> Tensor:
        """The last max-pool's output, as torchvision's `vgg16().features(x)`."""
        return self.features(x)


# ---------------------------------------------------------------------------------------------- builders
def init_torchvision_weights(module: nn.Module) -> nn.Module:
    """torchvision's initialisation for training from scratch (uses the global torch RNG; see `_seeded`).

    Convs: Kaiming normal (fan_out, ReLU), zero bias; BatchNorm: weight 1, bias 0, fresh statistics;
    Linear: PyTorch's default (uniform within 1/sqrt(fan_in)), as torchvision's ResNet leaves it.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            layer.reset_running_stats()
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            layer.reset_parameters()
    return module


def _seeded(build, seed: int) -> nn.Module:
    # Built and initialised under a private RNG state: the same seed gives the same weights and the
    # global torch RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return init_torchvision_weights(build())


def resnet18(width: int = 64, num_classes: int = 1000, seed: int = 0) -> ResNet:
    """ResNet-18 (torchvision layout), randomly initialised from `seed`; load weights with `load_imagenet_weights`."""
    return _seeded(lambda: ResNet(BasicBlock, (2, 2, 2, 2), width, num_classes=num_classes), seed)


def wide_resnet50_2(width: int = 64, num_classes: int = 1000, seed: int = 0) -> ResNet:
    """Wide-ResNet-50-2 (torchvision layout: ResNet-50 with bottlenecks twice as wide), randomly initialised."""
    return _seeded(lambda: ResNet(Bottleneck, (3, 4, 6, 3), width, width_per_group=2 * 64,
                                  num_classes=num_classes), seed)


def vgg16_features(width: int = 64, seed: int = 0) -> VGGFeatures:
    """VGG-16's `features` (13 convs, 5 max-pools; torchvision layout), randomly initialised from `seed`."""
    return _seeded(lambda: VGGFeatures(VGG16_CONFIG, width), seed)


IMAGENET_BUILDERS = {"resnet18": resnet18, "wide_resnet50_2": wide_resnet50_2, "vgg16": vgg16_features}


# ---------------------------------------------------------------------------------------------- weights
def _spec(arch: str) -> ImageNetWeights:
    if arch not in IMAGENET_WEIGHTS:
        raise BackboneError(f"no ImageNet weights known for {arch!r}; known: {', '.join(IMAGENET_WEIGHTS)}")
    return IMAGENET_WEIGHTS[arch]


def download_hint(arch: str) -> str:
    """How to fetch an architecture's weights once and point LTBench at the local copy."""
    repo = _spec(arch).repo
    return (f"download it once (`hf download {repo} {WEIGHTS_FILE} --local-dir DIR`) and pass "
            f"`--set backbone={arch}:DIR` (in Python: ltbench.backbones.create('{arch}:DIR'), "
            f"or load_imagenet_weights(module, 'DIR', '{arch}')); DIR may also be the file itself")


def resolve_imagenet_weights(arch: str, source: str | Path | None = None) -> Path:
    """The `model.safetensors` to load for `arch`.

    Parameters: arch: a key of IMAGENET_WEIGHTS; source: None for the Hub repository (downloaded
    once into the Hugging Face cache by `huggingface_hub.hf_hub_download`), or a local file or a
    folder holding `model.safetensors` ("" is refused: it is what "NAME:" with nothing after the colon gives).
    Returns: the path of the file.
    Raises: BackboneError naming the repository, the file and how to pass a local copy.
    """
    spec = _spec(arch)
    if source is not None and not str(source):  # "resnet18:" with nothing after the colon
        raise BackboneError(f"`{arch}:` needs a weights file or folder after the colon; {download_hint(arch)}")
    if source is None:
        try:
            # looked up on the module at call time, so tests can point it at a local file
            return Path(huggingface_hub.hf_hub_download(repo_id=spec.repo, filename=WEIGHTS_FILE))
        except Exception as exc:  # offline, missing, network and auth errors all get one actionable message
            raise BackboneError(f"could not get {WEIGHTS_FILE} of {spec.repo} for {arch} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                f"{download_hint(arch)}") from exc
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise BackboneError(f"{path} does not exist: no {arch} weights there; {download_hint(arch)}")
    return path


def first_of(problems: Sequence[str]) -> str:
    """The first problem in sorted order and how many others there are, for a one-line message."""
    ordered = sorted(problems)
    return ordered[0] + (f" (and {len(ordered) - 1} more)" if len(ordered) > 1 else "")


def load_imagenet_weights(module: nn.Module, source: str | Path | None, arch: str,
                          ignore: Sequence[str] = ()) -> Path:
    """Load the ImageNet weights of `arch` into `module` (in place), refusing any key that does not fit.

    Parameters: module: a network with torchvision's module names (e.g. from `resnet18()`); source:
    see `resolve_imagenet_weights` (None = the Hub repository); arch: "resnet18", "wide_resnet50_2"
    or "vgg16"; ignore: further key prefixes that may be absent on either side: modules the caller
    removed (e.g. "layer4." for a ResNet cut after layer3) or added (e.g. "stn1.").
    Returns: the path of the file loaded.
    Raises: WeightsMismatchError (one line, naming the file and the first offending key) when the
    file has a key the module lacks (other than classifier heads, `num_batches_tracked` and
    `ignore`), lacks one of the module's keys (other than `num_batches_tracked` and `ignore`), or
    a shape differs; BackboneError when the file cannot be found or read.
    """
    spec = _spec(arch)
    path = resolve_imagenet_weights(arch, source)
    try:
        state = load_file(str(path))
    except Exception as exc:  # not a safetensors file: a .pth, truncated download, HTML error page...
        raise BackboneError(f"{path} is not a readable safetensors file ({type(exc).__name__}); "
                            f"{download_hint(arch)}") from exc
    own = module.state_dict()
    ignored = tuple(ignore)
    problems = []
    for key in state.keys() - own.keys():
        if not (key.endswith(STATS_KEY) or key.startswith(spec.heads + ignored)):
            problems.append(f"unexpected key {key!r}")
    for key in own.keys() - state.keys():
        if not (key.endswith(STATS_KEY) or key.startswith(ignored)):
            problems.append(f"missing key {key!r}")
    for key in own.keys() & state.keys():
        if own[key].shape != state[key].shape:
            problems.append(f"key {key!r} has shape {tuple(state[key].shape)}, the {arch} module "
                            f"{tuple(own[key].shape)}")
    if problems:
        raise WeightsMismatchError(f"{path} does not fit {arch}: {first_of(problems)}; expected torchvision's "
                                   f"key names, as in {WEIGHTS_FILE} of {spec.repo}")
    module.load_state_dict({key: value for key, value in state.items() if key in own}, strict=False)
    return path
