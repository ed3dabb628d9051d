"""Runs that differ only in the split's seed or the run's seed, summarised as mean ± sample std (n).

With a few images per Low class, which images a split draws moves the Low numbers; so does the
run's own seed. `ltbench make-split --seed N` builds other draws of a recipe (configuration
"exp100-seedN") and `ltbench run --seed N` other runs. The leaderboard treats runs as repeats of
one configuration when their model, dataset and recipe (profile, beta, reverse) are equal, the
split was drawn from the same file list (its fingerprint; for a list manifest, the same pinned
images) and the detector configuration is equal apart from its `seed` field. Each cell then shows
the mean and the sample standard deviation (ddof=1) over those runs and their number n. A run
directory without `config.json` (written by hand) counts as run seed 0 of an unknown setting.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ltbench.errors import RunError, SplitError
from ltbench.rundir import CONFIG_FILE
from ltbench.split_names import LIST_PROFILE, config_name, parse_config

MISSING = "N/A"


class Entry(Protocol):
    """What grouping needs of a finished run (`ltbench.leaderboard.RunEntry`)."""

    model: str
    split: str
    run_dir: Path
    per_class: dict[str, dict[str, Any]]
    summary: dict[str, dict[str, float]]


@dataclass(frozen=True)
class RunIdentity:
    """Where a run sits among its repeats: its seeds and the setting repeats must share."""

    label: str          # the configuration without its split seed: "exp100" for "exp100-seed2"
    split_seed: int     # the seed that drew the split (0 for pinned splits and lists)
    run_seed: int       # `ltbench run --seed` (config.json "seed"); 0 without config.json
    setting: str        # file list and detector configuration without its seed, as canonical JSON


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json, or {} when the run directory has none."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); delete that run directory or rerun it") from None
    if not isinstance(record, dict):
        raise RunError(f"{path} is not a JSON object; it was not written by `ltbench run`")
    return record


def run_identity(split: str, run_dir: Path) -> RunIdentity:
    """The seeds and shared setting of one run, from its split name and its config.json.

    Parameters: split: "dataset/config" from metrics.json; run_dir: the run directory.
    Returns: the `RunIdentity`. A list manifest's rows are its identity (its CSV sha256); a recipe
    split is identified by the fingerprint of the file list it was drawn from.
    """
    config = split.split("/", 1)[1] if "/" in split else split
    try:
        profile, beta, reverse, split_seed = parse_config(config)
        label = config_name(profile, beta, reverse)
    except SplitError:  # a list manifest ("list-<name>") or a name this LTBench does not parse: no seeds
        profile, label, split_seed = LIST_PROFILE, config, 0
    record = _read_run_config(run_dir)
    detector_config = {k: v for k, v in (record.get("config") or {}).items() if k != "seed"}
    source = record.get("manifest_csv_sha256") if profile == LIST_PROFILE else record.get("source_fingerprint")
    setting = json.dumps({"source": source, "config": detector_config}, sort_keys=True)
    return RunIdentity(label=label, split_seed=split_seed, run_seed=int(record.get("seed", 0)), setting=setting)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1) of one metric over n runs, as fractions."""

    mean: float
    std: float | None  # None when n == 1
    n: int


def aggregate(values: Sequence[Any]) -> Stat | None:
    """Mean and sample std (ddof=1) of `values`; None (N/A) if there are none or any is missing or NaN.

    Nothing is imputed: a cell whose runs do not all have the value is N/A.
    """
    if not values or any(v is None or not isinstance(v, (int, float)) or math.isnan(v) for v in values):
        return None
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean=mean, std=std, n=n)


def format_stat(stat: Stat | None) -> str:
    """A percentage with two decimals ("72.10"), with " ± std (n=N)" when more than one run made it."""
    if stat is None:
        return MISSING
    if stat.n == 1:
        return f"{100.0 * stat.mean:.2f}"
    return f"{100.0 * stat.mean:.2f} ± {100.0 * stat.std:.2f} (n={stat.n})"


@dataclass
class RunGroup:
    """The runs of one model on one configuration that differ only in split seed or run seed."""

    model: str
    dataset: str
    config: str                      # the label, e.g. "exp100"
    runs: list[Any]                  # RunEntry objects, by (split seed, run seed)
    identities: list[RunIdentity]    # one per run, same order

    @property
    def classes(self) -> list[str]:
        """The class columns: the per-class keys of the first run (every repeat has the same classes)."""
        return list(self.runs[0].per_class)

    def summary_stat(self, group: str, metric: str) -> Stat | None:
        """"all" / "high" / "low" mean of `metric` aggregated over the runs."""
        return aggregate([run.summary.get(group, {}).get(metric) for run in self.runs])

    def class_stat(self, class_name: str, metric: str) -> Stat | None:
        """One class's `metric` aggregated over the runs."""
        return aggregate([run.per_class.get(class_name, {}).get(metric) for run in self.runs])

    def seeds_text(self) -> str:
        """"split seeds 0, 1, 2; run seed 0" (each list once, ascending)."""
        def listed(name: str, values: list[int]) -> str:
            unique = sorted(set(values))
            return f"{name} seed{'s' if len(unique) > 1 else ''} {', '.join(map(str, unique))}"

        return (f"{listed('split', [i.split_seed for i in self.identities])}; "
                f"{listed('run', [i.run_seed for i in self.identities])}")


def group_runs(runs: Sequence[Entry], order_key: Callable[[Path], Any]) -> tuple[list[RunGroup], list[str]]:
    """Group runs that differ only in split seed or run seed (see the module docstring).

    Parameters: runs: one run per (model, split, run seed, setting) (the latest, as `collect_runs`
    keeps); order_key: orders run directories by age (`run_sort_key`).
    Returns: (groups by dataset, configuration and model; notes saying which groups are
    aggregates over which seeds and which runs were left out). When runs of one model and label
    come in several settings (another detector configuration or file list), the setting of the
    latest run is shown and the others are named in a note.
    """
    settings: dict[tuple[str, str, str], dict[str, list[tuple[Any, RunIdentity]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        identity = run_identity(run.split, run.run_dir)
        dataset = run.split.split("/", 1)[0]
        settings[(run.model, dataset, identity.label)][identity.setting].append((run, identity))
    groups, notes = [], []
    for (model, dataset, label), by_setting in settings.items():
        ranked = sorted(by_setting.values(), key=lambda members: max(order_key(r.run_dir) for r, _ in members))
        chosen = sorted(ranked[-1], key=lambda member: (member[1].split_seed, member[1].run_seed))
        left_out = [str(r.run_dir) for members in ranked[:-1] for r, _ in members]
        if left_out:
            notes.append(f"{model} on {dataset}/{label}: left out {len(left_out)} run(s) with another detector "
                         f"configuration or file list than the latest run ({', '.join(left_out)})")
        group = RunGroup(model, dataset, label, [r for r, _ in chosen], [i for _, i in chosen])
        if len(chosen) > 1:
            notes.append(f"{model} on {dataset}/{label}: mean ± sample standard deviation (ddof=1) over "
                         f"n={len(chosen)} runs ({group.seeds_text()})")
        groups.append(group)
    groups.sort(key=lambda g: (g.dataset, g.config, g.model))
    return groups, notes
