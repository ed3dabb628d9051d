"""What a run is configured with: the preset, `--config FILE.json`, `--set key=value`, the device.

The detector config is `Config(**{**preset, **config file, **--set})` (DESIGN.md, "The detector
contract"); each choice comes back with a sentence saying why, which the runner logs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ltbench.detector import make_config, parse_set_values
from ltbench.errors import ConfigError


def choose_preset(detector_cls: type, split_name: str, preset: str | None) -> tuple[str | None, dict[str, Any], str]:
    """Pick the preset: `preset` if given, else "quick" for synth/* splits, else "paper".

    Returns: (preset name or None, its overrides, a sentence saying why). Raises `ConfigError`
    for a preset the class does not define (listing those it does).
    """
    presets = getattr(detector_cls, "PRESETS", None) or {}
    name = detector_cls.__qualname__
    if preset is not None:
        if preset not in presets:
            known = ", ".join(sorted(presets)) or "none"
            raise ConfigError(f"unknown preset {preset!r} for {name}; its presets: {known}")
        return preset, dict(presets[preset]), f"{preset} (from --preset)"
    default = "quick" if split_name.startswith("synth/") else "paper"
    if default in presets:
        why = "default on synth/* splits" if default == "quick" else "default off the synthetic set"
        return default, dict(presets[default]), f"{default} ({why})"
    if not presets:
        return None, {}, f"none ({name} defines no PRESETS; using its Config defaults)"
    return None, {}, f"none ({name} has no {default!r} preset; using its Config defaults)"


def read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object of a `--config` file; errors name the file."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of config fields; got {type(values).__name__}")
    return values


def build_config(detector_cls: type, preset_values: dict[str, Any], config_file: Path | None,
                 set_values: Sequence[str]) -> Any:
    """`Config(**{**preset, **config file, **--set})`; unknown keys are errors listing the valid ones."""
    values = dict(preset_values)
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update(parse_set_values(detector_cls.Config, list(set_values)))
    return make_config(detector_cls.Config, values)


def choose_device(device: str | None) -> tuple[torch.device, str]:
    """The device to run on and a sentence saying why."""
    available = torch.cuda.is_available()
    if device is None:
        return (torch.device("cuda"), "cuda (default: a CUDA device is available)") if available \
            else (torch.device("cpu"), "cpu (default: no CUDA device found)")
    if device == "cuda" and not available:
        raise ConfigError("--device cuda: no CUDA device is available on this machine; use --device cpu")
    return torch.device(device), f"{device} (from --device)"


def jsonable(value: Any) -> Any:
    """A config value as JSON: tuples become lists, paths strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
