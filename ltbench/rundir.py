"""The run directory's layout: its file names, its partial folder, its order and its record.

`runs/<model>/<dataset>-<config>/<timestamp>/` (DESIGN.md, "The run directory") is built in a
hidden folder `.<timestamp>.partial` beside its final place and renamed when complete. Every
module that writes or reads run directories (the runner, `ltbench predict`, the leaderboard,
detectors keeping training state) takes the names from here. No torch: the leaderboard imports
this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from ltbench.errors import RunError

CONFIG_FILE = "config.json"            # the run record: detector config, split, seed, versions, command
METRICS_FILE = "metrics.json"          # written last but one: its presence marks a finished run
PER_CLASS_FILE = "per_class.csv"
SCORES_FILE = "scores.csv"             # one row per test image (also what `ltbench predict` writes)
LOG_FILE = "log.txt"
MODEL_DIR = "model"                    # the saved detector (config.json + *.safetensors)
MAPS_DIR = "maps"                      # overlay PNGs, one folder per class
CHECKPOINT_DIR = "checkpoints"         # training state kept for --resume; removed when the run finishes
VALUE_RANGES_FILE = "value_ranges.json"  # in maps/: the colour range of each class's heat maps
PARTIAL_SUFFIX = ".partial"
RECORD_KEYS = ("model", "detector", "config", "split", "seed")  # what every config.json holds

_STAMP = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")


def run_sort_key(run_dir: Path) -> tuple[str, int, float]:
    """Order runs by their timestamp folder name (then the collision suffix), else by modification time."""
    match = _STAMP.match(run_dir.name)
    if match:
        return match.group(1), int(match.group(2) or 0), 0.0
    return "", 0, run_dir.stat().st_mtime


def new_partial_dir(parent: Path) -> tuple[Path, Path]:
    """Create `.<timestamp>.partial` under `parent`; returns (partial folder, final run folder).

    The timestamp gets a suffix -1, -2, ... when a run of the same second exists, so that no
    run directory is ever overwritten.
    """
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        name = stamp if n == 0 else f"{stamp}-{n}"
        final = parent / name
        partial = parent / f".{name}{PARTIAL_SUFFIX}"
        if final.exists():
            continue
        try:
            partial.mkdir()
        except FileExistsError:
            continue
        return partial, final
    raise RunError(f"cannot find a free run directory name under {parent}")


def locate_partial(path: Path) -> tuple[Path, Path]:
    """The partial folder of an interrupted run, given it or its final path; returns (partial, final)."""
    path = Path(path)
    if path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX):
        partial, final = path, path.parent / path.name[1:-len(PARTIAL_SUFFIX)]
    else:
        partial, final = path.parent / f".{path.name}{PARTIAL_SUFFIX}", path
    if partial.is_dir():
        if not (partial / CONFIG_FILE).is_file():
            raise RunError(f"{partial} has no {CONFIG_FILE}; it is not a run folder LTBench can resume")
        return partial, final
    if (final / METRICS_FILE).is_file():
        raise RunError(f"{final} is a finished run; there is nothing to resume (start a new run instead)")
    raise RunError(f"no interrupted run at {path}: expected a folder {partial.name} made by `ltbench run`")


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """The config.json of a run (finished or partial); errors name the file."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing; is {run_dir} a run directory made by `ltbench run`?") from None
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None
    for key in RECORD_KEYS:
        if key not in record:
            raise RunError(f"{path} lacks {key!r}; it was not written by `ltbench run`")
    return record


def finished_metrics_files(runs_dir: Path) -> Iterator[Path]:
    """The metrics.json of every finished run below `runs_dir`, sorted by path.

    Hidden folders (unfinished `.partial` runs, a model's `.model.tmp` staging) are skipped.
    """
    runs_dir = Path(runs_dir)
    for path in sorted(runs_dir.rglob(METRICS_FILE)):
        if not any(part.startswith(".") for part in path.relative_to(runs_dir).parts):
            yield path
