"""The detector contract (DESIGN.md, "The detector contract"), the registry, and a torch base class.

Any class with `Config`, `__init__(config)`, `fit(train) -> self`, `predict(images, class_idx)
-> Prediction`, `save(directory)` and classmethod `load(directory)` is a detector. The runner
relies on nothing else. `TorchDetector` is an optional base that supplies strict
config.json + safetensors persistence for detectors whose learned state is one `nn.Module`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from ltbench.errors import ConfigError, DetectorError

IMAGE_SIZE = 224  # evaluation size of images and anomaly maps (DESIGN.md, "Evaluation protocol")


@dataclass
class Prediction:
    """What `predict` returns for a batch of B images."""

    image_scores: Tensor  # (B,) float, higher = more anomalous
    anomaly_maps: Tensor  # (B, 224, 224) float, higher = more anomalous


@runtime_checkable
class TrainSet(Protocol):
    """What the runner hands to `fit()`."""

    class_names: list[str]  # the split's class order; class_idx indexes this list
    device: torch.device  # where the runner wants the work done
    checkpoint_dir: Path  # where fit() may keep training state; --resume hands back the same folder

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield images (B, 3, 224, 224) float32 RGB in [0, 1] and class_idx (B,) int64."""
        ...


# ----------------------------------------------------------------------------- registry

# Built-in detectors, imported lazily so that `ltbench --help` does not import every model.
BUILTIN_DETECTORS: dict[str, str] = {
    "uniad": "baselines.uniad:UniAD",
    "ltad": "ltad_model:LTAD",
    "ltad_wo_sad": "ltad_model:LTADWithoutSAD",
}
ENTRY_POINT_GROUP = "ltbench.detectors"
REQUIRED_MEMBERS = ("Config", "fit", "predict", "save", "load")


def _entry_point_detectors() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_detectors() -> dict[str, str]:
    """Every registered name mapped to its `module:Class` target (built-ins win over plugins)."""
    return {**_entry_point_detectors(), **BUILTIN_DETECTORS}


def _import_target(target: str) -> type:
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise DetectorError(f"detector target {target!r} must look like package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DetectorError(f"cannot import module {module_name!r} for detector {target!r}: {exc}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise DetectorError(f"module {module_name!r} has no class {class_name!r}; check the spelling") from None


def get_detector_class(name: str) -> type:
    """Resolve a registered name or a `package.module:ClassName` target to a class meeting the contract."""
    registry = known_detectors()
    if name in registry:
        cls = _import_target(registry[name])
    elif ":" in name:
        cls = _import_target(name)
    else:
        known = ", ".join(sorted(registry))
        raise DetectorError(f"unknown model {name!r}; known models: {known} (or give package.module:ClassName)")
    validate_detector_class(cls)
    return cls


def validate_detector_class(cls: type) -> None:
    """Raise `DetectorError` naming the first missing member of the contract."""
    for member in REQUIRED_MEMBERS:
        if not hasattr(cls, member):
            raise DetectorError(f"detector {cls.__module__}.{cls.__qualname__} does not meet the contract: missing {member!r}")
    if not dataclasses.is_dataclass(cls.Config):
        raise DetectorError(f"detector {cls.__qualname__}: Config must be a dataclass")


# ----------------------------------------------------------------------------- configs


def config_to_dict(config: Any) -> dict[str, Any]:
    """A detector config as a JSON-ready dict."""
    return dataclasses.asdict(config)


def make_config(config_cls: type, values: dict[str, Any]) -> Any:
    """Build `config_cls(**values)`, rejecting unknown keys with the list of valid ones."""
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r} for {config_cls.__qualname__}; valid keys: {', '.join(sorted(valid))}"
        )
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {config_cls.__qualname__}: {exc}") from None


# ----------------------------------------------------------------------------- torch base


class TorchDetector:
    """Base for detectors whose learned state is one `nn.Module` (`self.module_`).

    Subclasses define `Config`, `fit`, `predict` and `build_module(meta)`, which builds the
    learnable module from `meta` (a JSON-ready dict of facts learned in `fit`, e.g. the class
    names or feature channels; stored in `self.meta_`). Frozen backbones are not saved: they
    are recreated by name from the config.
    """

    Config: ClassVar[type]
    CONFIG_FILE = "config.json"
    WEIGHTS_FILE = "model.safetensors"

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    # -- to implement
    def build_module(self, meta: dict[str, Any]) -> torch.nn.Module:
        raise NotImplementedError

    # -- provided
    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise DetectorError(f"{type(self).__name__}.predict called before fit(); train it or load() a saved one")

    def save(self, directory: Path) -> None:
        """Write config.json (config + meta) and model.safetensors into `directory`."""
        from safetensors.torch import save_file

        from ltbench import io

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"detector": f"{type(self).__module__}:{type(self).__qualname__}",
                   "config": config_to_dict(self.config), "meta": self.meta_}
        state = {k: v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
        with io.atomic_path(directory / self.WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        io.write_json(directory / self.CONFIG_FILE, payload)

    @classmethod
    def load(cls, directory: Path) -> "TorchDetector":
        """Rebuild a saved detector; unknown or missing config or weight keys are errors."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / cls.CONFIG_FILE
        weights_path = directory / cls.WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise DetectorError(f"{path} is missing; is {directory} a saved {cls.__name__} model directory?")
        try:
            payload = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise DetectorError(f"{config_path} is not valid JSON ({exc}); the saved model is corrupt") from None
        if set(payload) != {"detector", "config", "meta"}:
            raise DetectorError(f"{config_path} must hold exactly 'detector', 'config' and 'meta'; found {sorted(payload)}")
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        missing = sorted(fields - set(payload["config"]))
        if missing:
            raise DetectorError(f"{config_path} lacks config keys {missing}; it was saved by another version")
        detector = cls(make_config(cls.Config, payload["config"]))
        detector.meta_ = payload["meta"]
        detector.module_ = detector.build_module(detector.meta_)
        try:
            detector.module_.load_state_dict(load_file(str(weights_path)), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise DetectorError(f"{weights_path} does not match {cls.__name__}: {first}") from None
        detector.module_.eval()
        return detector
