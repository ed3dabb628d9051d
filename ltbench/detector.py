"""The detector contract (DESIGN.md, "The detector contract"), the registry, and a torch base class.

Any class with `Config`, `__init__(config)`, `fit(train) -> self`, `predict(images, class_idx)
-> Prediction`, `save(directory)` and classmethod `load(directory)` is a detector. The runner
relies on nothing else. `TorchDetector` is an optional base that supplies strict
config.json + safetensors persistence for detectors whose learned state is one `nn.Module`.

Two optional parts of the contract:
- A detection-only detector (Cut & Paste) returns `Prediction(image_scores, anomaly_maps=None)`
  for every batch; its run's pixel metrics are null (N/A in tables) and no overlays are drawn.
  Returning maps for some batches and None for others is an error.
- A detector that cannot score some classes (RegAD with fewer than 2 training images in a class)
  exposes `unscorable_classes_: dict[str, str]` (class name -> one-line reason) after `fit` and
  after `load`. The runner never asks it to predict those classes' images; their metrics, and
  every All/High/Low mean that includes them, are null, and the run names them. Nothing is imputed.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from ltbench.errors import ConfigError, DetectorError

IMAGE_SIZE = 224  # evaluation size of images and anomaly maps (DESIGN.md, "Evaluation protocol")


@dataclass
class Prediction:
    """What `predict` returns for a batch of B images.

    At least one of the two is given. `image_scores=None`: the runner takes the protocol's score
    from the maps (max of the 16x16 average-pooled map). `anomaly_maps=None`: the detector does
    not localise (detection only); it must then give `image_scores`, and do so for every batch.
    """

    image_scores: Tensor | None  # (B,) float, higher = more anomalous; None = from the maps
    anomaly_maps: Tensor | None  # (B, 224, 224) float, higher = more anomalous; None = detection only


def prediction_from_maps(anomaly_maps: Tensor) -> Prediction:
    """A `Prediction` of (B, 224, 224) maps with the protocol's image scores (`ltbench.metrics.image_score_from_map`)."""
    from ltbench.metrics import image_score_from_map

    return Prediction(image_scores=torch.from_numpy(image_score_from_map(anomaly_maps)).float(),
                      anomaly_maps=anomaly_maps)


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
    "cutpaste": "baselines.cutpaste:CutPaste",
    "uniad": "baselines.uniad:UniAD",
    "uniad_align": "baselines.uniad:UniADAlign",
    "draem": "baselines.draem:DRAEM",
    "ltad": "ltad_model:LTAD",
    "ltad_wo_sad": "ltad_model:LTADWithoutSAD",
    "regad": "baselines.regad:RegAD",
    "patchcore": "baselines.patchcore:PatchCore",
    "mkd": "baselines.mkd:MKD",
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


@dataclass(frozen=True)
class DetectorSpec:
    """A resolved `--model` value."""

    name: str    # the registered name, or the `package.module:ClassName` target as given
    target: str  # `package.module:ClassName`
    cls: type    # the class, checked against the contract

    @property
    def directory_name(self) -> str:
        """The name as a folder name (`runs/<model>/...`): a target's ':' becomes '.'."""
        return self.name.replace(":", ".").replace("/", ".")


def resolve_detector(name: str) -> DetectorSpec:
    """Resolve a registered name or a `package.module:ClassName` target.

    Parameters: name: `--model` as the user gave it.
    Returns: the `DetectorSpec`; a target that is registered under a name gets that name.
    Raises `DetectorError` for an unknown name (listing the known ones), an import failure, or
    a class that misses a member of the contract (naming it).
    """
    registry = known_detectors()
    if name in registry:
        target = registry[name]
    elif ":" in name:
        target = name
        name = next((known for known, known_target in sorted(registry.items()) if known_target == target), name)
    else:
        known = ", ".join(sorted(registry))
        raise DetectorError(f"unknown model {name!r}; known models: {known} (or give package.module:ClassName)")
    cls = _import_target(target)
    validate_detector_class(cls)
    return DetectorSpec(name=name, target=target, cls=cls)


def get_detector_class(name: str) -> type:
    """Resolve a registered name or a `package.module:ClassName` target to a class meeting the contract."""
    return resolve_detector(name).cls


def validate_detector_class(cls: Any) -> None:
    """Raise `DetectorError` naming the first missing or malformed member of the contract."""
    label = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
    if not isinstance(cls, type):
        raise DetectorError(f"{label} is not a class; --model must name a detector class")
    for member in REQUIRED_MEMBERS:
        if not hasattr(cls, member):
            raise DetectorError(f"detector {label} does not meet the contract: missing {member!r}")
    for method in ("fit", "predict", "save", "load"):
        if not callable(getattr(cls, method)):
            raise DetectorError(f"detector {label} does not meet the contract: {method!r} is not a method")
    if not isinstance(inspect_static(cls, "load"), (classmethod, staticmethod)):
        raise DetectorError(f"detector {label} does not meet the contract: 'load' must be a classmethod")
    if not (isinstance(cls.Config, type) and dataclasses.is_dataclass(cls.Config)):
        raise DetectorError(f"detector {label} does not meet the contract: Config must be a dataclass")


def inspect_static(cls: type, member: str) -> Any:
    """The raw class attribute `member` (a classmethod stays a `classmethod` object), searching the MRO."""
    for klass in cls.__mro__:
        if member in vars(klass):
            return vars(klass)[member]
    return None


def check_prediction(prediction: Any, batch_size: int, owner: str) -> tuple[Tensor | None, Tensor | None]:
    """Check what `predict` returned for a batch of `batch_size` images.

    Parameters: prediction: the returned object; owner: the detector's name for messages.
    Returns: (image_scores (B,) or None, anomaly_maps (B, 224, 224) or None), detached, on the
    CPU; never both None.
    Raises `DetectorError` saying which shape, dtype or value is wrong.
    """
    if not (hasattr(prediction, "image_scores") and hasattr(prediction, "anomaly_maps")):
        raise DetectorError(f"{owner}.predict must return a Prediction; got {type(prediction).__name__}")
    scores, maps = prediction.image_scores, prediction.anomaly_maps
    if scores is None and maps is None:
        raise DetectorError(f"{owner}.predict returned neither image_scores nor anomaly_maps; a detection-only "
                            "detector must return image_scores")
    expected_maps = (batch_size, IMAGE_SIZE, IMAGE_SIZE)
    if maps is not None and (not isinstance(maps, Tensor) or tuple(maps.shape) != expected_maps):
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise DetectorError(f"{owner}.predict: anomaly_maps must be a tensor of shape {expected_maps} or None; "
                            f"got {got}")
    if scores is not None and (not isinstance(scores, Tensor) or tuple(scores.shape) != (batch_size,)):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise DetectorError(f"{owner}.predict: image_scores must be a tensor of shape ({batch_size},); got {got}")
    for label, value in (("image_scores", scores), ("anomaly_maps", maps)):
        if value is None:
            continue
        if not value.is_floating_point():
            raise DetectorError(f"{owner}.predict: {label} must be floating point; got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise DetectorError(f"{owner}.predict: {label} holds NaN or infinite values")
    return (None if scores is None else scores.detach().cpu()), (None if maps is None else maps.detach().cpu())


def check_uniform(given: list[bool], what: str, owner: str) -> bool:
    """Whether `what` was given for the batches of a test set, which must be all or none of them.

    Parameters: given: one flag per batch (e.g. "anomaly_maps is not None"); what: the field's
    name; owner: the detector's name.
    Returns: True when every batch gave it, False when none did (or there were no batches).
    Raises `DetectorError` naming the detector when some batches gave it and others did not.
    """
    if any(given) and not all(given):
        raise DetectorError(f"{owner}.predict returned {what} for {sum(given)} of {len(given)} batches and None "
                            f"for the others; a detector returns {what} for every batch or for none")
    return bool(given) and all(given)


def unscorable_classes(detector: Any, class_names: list[str], owner: str) -> dict[str, str]:
    """The classes a fitted (or loaded) detector says it cannot score, checked.

    Parameters: detector: the detector; class_names: the split's classes; owner: its name.
    Returns: {class name: one-line reason}, in class order; {} when the detector has no
    `unscorable_classes_`.
    Raises `DetectorError` when it is not a dict of known class names to non-empty strings.
    """
    declared = getattr(detector, "unscorable_classes_", None)
    if declared is None:
        return {}
    if not isinstance(declared, dict):
        raise DetectorError(f"{owner}.unscorable_classes_ must be a dict of class name -> reason; "
                            f"got {type(declared).__name__}")
    unknown = sorted(str(name) for name in declared if name not in class_names)
    if unknown:
        raise DetectorError(f"{owner}.unscorable_classes_ names {unknown}, which are not classes of the split "
                            f"({', '.join(class_names)})")
    empty = [name for name, reason in declared.items() if not isinstance(reason, str) or not reason.strip()]
    if empty:
        raise DetectorError(f"{owner}.unscorable_classes_ gives no reason (a one-line string) for {empty}")
    return {name: declared[name] for name in class_names if name in declared}


# ----------------------------------------------------------------------------- configs


def config_to_dict(config: Any) -> dict[str, Any]:
    """A detector config as a JSON-ready dict."""
    return dataclasses.asdict(config)


def config_types(config_cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass."""
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError, AttributeError):  # an annotation that does not evaluate: untyped
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_cls)}


def _coerce(annotation: Any, value: Any) -> Any:
    """JSON lists become tuples where the field is a tuple (so a config survives a JSON round trip)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None) and typing.get_origin(arg) is tuple and isinstance(value, list):
                return _coerce(arg, value)
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], item) for item in value)
        if len(args) == len(value):
            return tuple(_coerce(arg, item) for arg, item in zip(args, value))
        return tuple(value)
    return value


def make_config(config_cls: type, values: dict[str, Any]) -> Any:
    """Build `config_cls(**values)`, rejecting unknown keys with the list of valid ones.

    Lists given for tuple fields (as JSON writes them) are turned back into tuples.
    """
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r} for {config_cls.__qualname__}; valid keys: {', '.join(sorted(valid))}"
        )
    annotations = config_types(config_cls)
    values = {key: _coerce(annotations[key], value) for key, value in values.items()}
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {config_cls.__qualname__}: {exc}") from None


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is None and hasattr(annotation, "__name__"):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def parse_config_value(annotation: Any, text: str) -> Any:
    """Parse the text of `--set key=value` into the type of the config field.

    Parameters: annotation: the field's type (bool, int, float, str, Path, Optional[...], tuple[...],
    list[...], Literal[...]); text: the value as typed. Tuples and lists are comma separated
    ("3,10,17" or "[3, 10, 17]"); "none" gives None for an Optional field.
    Returns: the parsed value. Raises `ValueError` when the text does not fit the type.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    stripped = text.strip()
    if annotation is Any:
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and stripped.lower() in ("none", "null", ""):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_config_value(arg, text)
            except ValueError:
                continue
        raise ValueError(f"expected {' or '.join(_type_name(a) for a in args if a is not type(None))}")
    if origin is typing.Literal:
        for option in args:
            if str(option) == stripped:
                return option
        raise ValueError(f"expected one of {', '.join(str(a) for a in args)}")
    if origin in (tuple, list):
        inner = stripped[1:-1] if stripped[:1] in "([" and stripped[-1:] in ")]" else stripped
        items = [item.strip() for item in inner.split(",")] if inner.strip() else []
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(parse_config_value(arg, item) for arg, item in zip(args, items))
        item_type = args[0] if args else Any
        parsed = [parse_config_value(item_type, item) for item in items]
        return tuple(parsed) if origin is tuple else parsed
    if annotation is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if annotation is int:
        try:
            return int(stripped)
        except ValueError:
            raise ValueError("expected an integer") from None
    if annotation is float:
        try:
            return float(stripped)
        except ValueError:
            raise ValueError("expected a number") from None
    if annotation is str:
        return text
    if annotation is Path:
        return Path(stripped)
    if origin is dict or annotation is dict:
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            raise ValueError("expected a JSON object") from None
    raise ValueError(f"cannot parse a value of type {_type_name(annotation)} from the command line; use --config")


def parse_set_values(config_cls: type, assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse `--set key=value` assignments against the fields of `config_cls`.

    Parameters: assignments: strings "key=value".
    Returns: {key: value parsed to the field's type}. Raises `ConfigError` for a missing '=',
    an unknown key (listing the valid ones) or a value of the wrong type.
    """
    annotations = config_types(config_cls)
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {assignment!r} must look like key=value")
        if key not in annotations:
            raise ConfigError(
                f"unknown --set key {key!r} for {config_cls.__qualname__}; valid keys: {', '.join(sorted(annotations))}"
            )
        try:
            values[key] = parse_config_value(annotations[key], text)
        except ValueError as exc:
            raise ConfigError(f"--set {key}={text!r}: {exc} ({_type_name(annotations[key])})") from None
    return values


# ----------------------------------------------------------------------------- training state

TRAINING_STATE_FILE = "training_state.pt"


def save_training_state(checkpoint_dir: Path, state: dict[str, Any]) -> None:
    """Atomically keep training state (e.g. epoch, module and optimizer state dicts) in `checkpoint_dir`.

    The torch random generator states (CPU and CUDA) are stored with it, so that a resumed run
    draws the same random numbers as an uninterrupted one. Values must be tensors, numbers,
    strings, or lists/dicts of them (loaded back with `torch.load(weights_only=True)`).
    """
    from ltbench import distributed, io

    if not distributed.info().is_main:  # one writer: every rank holds the same synchronised state
        return
    payload = {"state": state, "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    with io.atomic_path(Path(checkpoint_dir) / TRAINING_STATE_FILE) as tmp:
        torch.save(payload, tmp)


def load_training_state(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The state last passed to `save_training_state` (restoring the random generators), or None."""
    path = Path(checkpoint_dir) / TRAINING_STATE_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises many types for a damaged file
        raise DetectorError(f"cannot read the training state {path} ({exc}); delete it to restart training") from None
    torch.set_rng_state(payload["torch_rng"])
    if "cuda_rng" in payload and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return payload["state"]


# ----------------------------------------------------------------------------- torch base


def read_saved_model(cls: type, directory: Path) -> tuple[Path, Path, Any]:
    """(config.json path, weights path, parsed config.json) of a model saved by `TorchDetector.save`.

    Raises `DetectorError` naming the missing file or the file that is not JSON.
    """
    directory = Path(directory)
    config_path = directory / TorchDetector.CONFIG_FILE
    weights_path = directory / TorchDetector.WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise DetectorError(f"{path} is missing; is {directory} a saved {cls.__name__} model directory?")
    try:
        payload = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise DetectorError(f"{config_path} is not valid JSON ({exc}); the saved model is corrupt") from None
    return config_path, weights_path, payload


def read_meta(meta_cls: type, values: Any, path: Path) -> Any:
    """The typed metadata `meta_cls(**values)` of a saved model; unknown or missing keys are errors naming `path`."""
    if not isinstance(values, dict):
        raise DetectorError(f"{path}: 'meta' must be a JSON object; the saved model is corrupt")
    fields = {f.name for f in dataclasses.fields(meta_cls)}
    unknown, missing = sorted(set(values) - fields), sorted(fields - set(values))
    if unknown or missing:
        raise DetectorError(f"{path}: meta keys do not match {meta_cls.__qualname__} (unknown {unknown}, missing "
                            f"{missing}); it was saved by another version of the model")
    annotations = config_types(meta_cls)
    return meta_cls(**{key: _coerce(annotations[key], value) for key, value in values.items()})


class TorchDetector(abc.ABC):
    """Base for detectors whose learned state is one `nn.Module` (`self.module_`).

    Subclasses define `Config`, `Meta` (a dataclass of the facts learned in `fit` that size the
    module, e.g. the class names or feature channels; stored in `self.meta_` and written into
    config.json), `fit`, `predict` and `build_module(meta)`, which builds the learnable module
    from the meta. Frozen backbones are not saved: they are recreated by name from the config.
    A detector that cannot score some classes gives its `Meta` a field
    `unscorable_classes: dict[str, str]` (class name -> reason); `unscorable_classes_` then
    exposes it after `fit` and after `load`.
    """

    Config: ClassVar[type]
    Meta: ClassVar[type]
    CONFIG_FILE = "config.json"
    WEIGHTS_FILE = "model.safetensors"

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    # -- to implement
    @abc.abstractmethod
    def build_module(self, meta: Any) -> torch.nn.Module:
        """The learnable module, sized by `meta` (a `Meta`); `load` calls it before loading the weights."""

    # -- provided
    @property
    def unscorable_classes_(self) -> dict[str, str]:
        """Class name -> why this detector cannot score it (from `meta_.unscorable_classes`; {} without that field)."""
        meta = self.__dict__.get("meta_")
        return dict(getattr(meta, "unscorable_classes", None) or {})

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise DetectorError(f"{type(self).__name__}.predict called before fit(); train it or load() a saved one")

    def check_inputs(self, images: Tensor, class_idx: Tensor) -> torch.device:
        """Refuse malformed `predict` inputs (shapes, class range); returns the device the module lives on.

        The class range is checked against `self.meta_.class_names` when the Meta has that field.
        """
        self._check_fitted()
        name = type(self).__name__
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise DetectorError(f"{name}.predict expects images (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
        if class_idx.shape != images.shape[:1]:
            raise DetectorError(f"{name}.predict: class_idx must have shape ({len(images)},), got {tuple(class_idx.shape)}")
        class_names = getattr(self.meta_, "class_names", None)
        if class_names is not None and len(class_idx) and (
                int(class_idx.min()) < 0 or int(class_idx.max()) >= len(class_names)):
            raise DetectorError(f"{name}.predict: class_idx must lie in [0, {len(class_names)}) (the training split's classes)")
        tensors = [*self.module_.parameters(), *self.module_.buffers()]  # a memory bank has buffers only
        return tensors[0].device if tensors else torch.device("cpu")

    def save(self, directory: Path) -> None:
        """Write config.json (config + meta) and model.safetensors into `directory`."""
        from safetensors.torch import save_file

        from ltbench import io

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"detector": f"{type(self).__module__}:{type(self).__qualname__}",
                   "config": config_to_dict(self.config), "meta": dataclasses.asdict(self.meta_)}
        state = {k: v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
        with io.atomic_path(directory / self.WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        io.write_json(directory / self.CONFIG_FILE, payload)

    @classmethod
    def load(cls, directory: Path) -> TorchDetector:
        """Rebuild a saved detector; unknown or missing config, meta or weight keys are errors."""
        from safetensors.torch import load_file

        config_path, weights_path, payload = read_saved_model(cls, directory)
        if set(payload) != {"detector", "config", "meta"}:
            raise DetectorError(f"{config_path} must hold exactly 'detector', 'config' and 'meta'; found {sorted(payload)}")
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        missing = sorted(fields - set(payload["config"]))
        if missing:
            raise DetectorError(f"{config_path} lacks config keys {missing}; it was saved by another version")
        detector = cls(make_config(cls.Config, payload["config"]))
        detector.meta_ = read_meta(cls.Meta, payload["meta"], config_path)
        detector.module_ = detector.build_module(detector.meta_)
        try:
            detector.module_.load_state_dict(load_file(str(weights_path)), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise DetectorError(f"{weights_path} does not match {cls.__name__}: {first}") from None
        detector.module_.eval()
        return detector
