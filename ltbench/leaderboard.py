"""Leaderboards computed from run directories, in the layout of the LTAD paper's tables.

Summary (paper Tables 3-5): one table per dataset; rows are configurations x task (Det. =
image AUROC, Seg. = pixel AUROC), columns are methods, each cell the mean over all classes.
Per class (supplementary Tables 10-49): one table per configuration and metric; rows are
methods, columns All, High, Low and then each class in the split's order. Values are
percentages with two decimals. Only `metrics.json` (and `config.json`) files of finished runs are
read (never a file that runs append to); for each (model, split, run seed, setting) the latest run
counts. Runs that differ only in the split's seed or the run's seed are one cell: mean ± sample
standard deviation (ddof=1) and their number n (`ltbench.seed_groups`).
"""

from __future__ import annotations

import csv
import io as _text_io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ltbench.datasets import DATASETS, dataset_info
from ltbench.errors import RunError
from ltbench.missing import MISSING, NO_MAPS, groups_holding, unscored_text
from ltbench.resources import data_file
from ltbench.rundir import finished_metrics_files, run_sort_key
from ltbench.seed_groups import RunGroup, aggregate, format_stat, group_runs, run_identity

PAPER_RESULTS = data_file("paper/ltad_cvpr2024_results.csv")
# Column names of the paper's tables, in the paper's column order (Table 3).
PAPER_METHODS = {
    "cutpaste": "Cut & Paste", "mkd": "MKD", "draem": "DRAEM", "regad": "RegAD", "uniad": "UniAD",
    "anomalygpt": "AnomalyGPT", "patchcore": "PatchCore", "ltad_wo_sad": "LTAD w/o SAD", "ltad": "LTAD",
}
# How our runs' columns and rows are labelled: the paper's name where the model is one of its methods (so a run
# of `mkd` stands as "MKD" beside "MKD (reported)"), a few more display names, else the registered name.
DISPLAY_NAMES = {**PAPER_METHODS, "uniad_align": "UniAD w/ ALIGN"}
SUMMARY_SOURCES = ("Table 3", "Table 4", "Table 5")  # the summary tables; the rest are supplementary
TASKS = (("Det.", "image_auroc"), ("Seg.", "pixel_auroc"))
METRIC_TITLES = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC"}
REPORTED = " (reported)"


@dataclass(frozen=True)
class RunEntry:
    """The metrics of one finished run."""

    model: str
    split: str                            # "dataset/config"
    run_dir: Path
    per_class: dict[str, dict[str, Any]]  # class -> {"group", metric keys (fractions)}
    summary: dict[str, dict[str, float]]  # "all" / "high" / "low" -> metric keys (fractions)
    unscored: dict[str, str] = field(default_factory=dict)  # classes the model cannot score -> reason
    detection_only: bool = False          # no anomaly maps: Seg. is N/A

    @property
    def dataset(self) -> str:
        return self.split.split("/", 1)[0]

    @property
    def config(self) -> str:
        return self.split.split("/", 1)[1] if "/" in self.split else self.split


@dataclass
class Table:
    """One table: `keys` say which dataset/configuration it covers (they become CSV columns)."""

    title: str
    keys: dict[str, str]
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Leaderboard:
    """The tables to print and notes about how they were made (e.g. superseded runs)."""

    tables: list[Table]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading runs


def _read_metrics(path: Path) -> RunEntry:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); delete that run directory or rerun it") from None
    if not isinstance(data, dict) or not {"model", "split", "per_class", "summary"} <= set(data):
        raise RunError(f"{path} lacks model, split, per_class or summary; it was not written by `ltbench run`")
    return RunEntry(model=str(data["model"]), split=str(data["split"]), run_dir=path.parent,
                    per_class=data["per_class"], summary=data["summary"], unscored=dict(data.get("unscored") or {}),
                    detection_only=bool(data.get("detection_only", False)))


def missing_value_notes(runs: list[RunEntry]) -> list[str]:
    """Why cells are N/A: the classes each run could not score, and the detection-only runs."""
    notes = []
    for run in runs:
        if run.unscored:
            groups = ", ".join(groups_holding(run.per_class, run.unscored))
            notes.append(f"{run.model} on {run.split}: {MISSING} in {groups} and the class columns of the classes it "
                         f"cannot score: {unscored_text(run.unscored)}")
        if run.detection_only:
            notes.append(f"{run.model} on {run.split}: Seg. (pixel AUROC) is {MISSING}: {NO_MAPS}")
    return notes


def collect_runs(runs_dir: Path, dataset: str | None = None) -> tuple[list[RunEntry], list[str]]:
    """Every finished run under `runs_dir`, the latest per (model, split, run seed, setting).

    Parameters: runs_dir: a folder of run directories (searched recursively; hidden folders,
    such as unfinished `.partial` runs, are skipped); dataset: keep only this dataset.
    Returns: (runs sorted by split then model, notes saying which older runs were left out). Runs of
    one split with another run seed or detector configuration (`seed_groups.run_identity`) are kept.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise RunError(f"runs folder {runs_dir} does not exist; run `ltbench run` first or give RUNS_DIR")
    found: dict[tuple[str, str, int, str], list[RunEntry]] = defaultdict(list)
    for path in finished_metrics_files(runs_dir):
        entry = _read_metrics(path)
        if dataset is None or entry.dataset == dataset:
            identity = run_identity(entry.split, entry.run_dir)
            found[(entry.model, entry.split, identity.run_seed, identity.setting)].append(entry)
    runs, notes = [], []
    for (model, split, *_), entries in sorted(found.items(), key=lambda item: (item[0][1], item[0][0], item[0][2])):
        entries.sort(key=lambda e: run_sort_key(e.run_dir))
        runs.append(entries[-1])
        if len(entries) > 1:
            notes.append(f"{model} on {split}: using the latest of {len(entries)} runs ({entries[-1].run_dir})")
    return runs, notes


# ----------------------------------------------------------------------------- published numbers


@lru_cache(maxsize=1)
def paper_results() -> dict[tuple[str, str, str, str, str], list[tuple[float, str]]]:
    """The published numbers: (dataset, config, method, metric, group) -> [(value 0-100, source table)]."""
    table: dict[tuple[str, str, str, str, str], list[tuple[float, str]]] = defaultdict(list)
    with open(PAPER_RESULTS, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            key = (row["dataset"], row["config"], row["method"], row["metric"], row["group"])
            table[key].append((float(row["value"]), row["source_table"].strip()))
    return dict(table)


def paper_value(dataset: str, config: str, method: str, metric: str, group: str, summary: bool) -> float | None:
    """A published value (0-100), preferring the summary tables (`summary`) or the supplementary ones."""
    values = paper_results().get((dataset, config, method, metric, group))
    if not values:
        return None
    preferred = [v for v, source in values if (source in SUMMARY_SOURCES) == summary]
    return (preferred or [v for v, _ in values])[0]


def paper_configs(dataset: str) -> list[str]:
    """The configurations the paper reports for a dataset."""
    return sorted({key[1] for key in paper_results() if key[0] == dataset}, key=config_sort_key)


def paper_classes(dataset: str, config: str) -> list[str]:
    """The class columns of the paper's supplementary table for a configuration, in its order."""
    seen: dict[str, None] = {}
    for key in paper_results():
        if key[0] == dataset and key[1] == config and key[4] not in ("all", "high", "low"):
            seen.setdefault(key[4], None)
    return list(seen)


# ----------------------------------------------------------------------------- tables


def config_sort_key(config: str) -> tuple[int, int, bool, str]:
    """exp before step, then by imbalance factor, the reversed order last (the paper's row order)."""
    profile = 0 if config.startswith("exp") else 1 if config.startswith("step") else 2
    digits = "".join(ch for ch in config.split("-")[0] if ch.isdigit())
    return profile, int(digits) if digits else 0, config.endswith("reverse"), config


def _dataset_key(dataset: str) -> tuple[int, str]:
    return (DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS)), dataset


def format_fraction(value: Any) -> str:
    """A metric fraction as a percentage with two decimals; missing or NaN as N/A (one run's cell)."""
    return format_stat(aggregate([value]))


def format_reported(value: float | None) -> str:
    """A published value (already a percentage) with two decimals."""
    return MISSING if value is None else f"{value:.2f}"


def _title(dataset: str) -> str:
    """The dataset's name in table titles ("MVTec", as the paper writes it); unknown names as they are."""
    return dataset_info(dataset).table_title if dataset in DATASETS else dataset


def display_name(model: str) -> str:
    """The label of a model's runs in the tables: the paper's name (`mkd` → "MKD"), else the registered name."""
    return DISPLAY_NAMES.get(model, model)


def _models(runs: list[RunGroup]) -> list[str]:
    """Run models in the paper's column order where they match a paper method, then by name."""
    names = sorted({r.model for r in runs})
    order = list(PAPER_METHODS)
    return sorted(names, key=lambda m: (order.index(m) if m in order else len(order), m))


def summary_tables(runs: list[RunGroup], datasets: list[str], with_paper: bool) -> list[Table]:
    """One table per dataset: rows configuration x (Det., Seg.), columns methods, cells the All mean (± std, n)."""
    tables = []
    for dataset in datasets:
        mine = [r for r in runs if r.dataset == dataset]
        configs = {r.config for r in mine}
        if with_paper:
            configs |= set(paper_configs(dataset))
        configs_sorted = sorted(configs, key=config_sort_key)
        models = _models(mine)
        by_key = {(r.model, r.config): r for r in mine}
        reported = [m for m in PAPER_METHODS if with_paper and any(
            paper_value(dataset, c, m, metric, "all", True) is not None for c in configs_sorted for _, metric in TASKS)]
        columns = ["Config.", "Task", *(display_name(m) for m in models), *(PAPER_METHODS[m] + REPORTED for m in reported)]
        rows = []
        for config in configs_sorted:
            for task, metric in TASKS:
                cells = [config, task]
                for model in models:
                    run = by_key.get((model, config))
                    cells.append(format_stat(run.summary_stat("all", metric)) if run else MISSING)
                cells += [format_reported(paper_value(dataset, config, m, metric, "all", True)) for m in reported]
                rows.append(cells)
        title = (f"{_title(dataset)}: detection (Det., image AUROC) and segmentation (Seg., pixel AUROC), "
                 "mean over all classes, %")
        tables.append(Table(title=title, keys={"dataset": dataset}, columns=columns, rows=rows))
    return tables


def per_class_tables(runs: list[RunGroup], datasets: list[str], with_paper: bool) -> list[Table]:
    """One table per configuration and metric: rows methods, columns All, High, Low and each class."""
    tables = []
    for dataset in datasets:
        mine = [r for r in runs if r.dataset == dataset]
        configs = {r.config for r in mine} | (set(paper_configs(dataset)) if with_paper else set())
        for config in sorted(configs, key=config_sort_key):
            here = {r.model: r for r in mine if r.config == config}
            models = _models(list(here.values()))
            if models:
                classes = here[models[0]].classes
            else:
                classes = paper_classes(dataset, config)
            for _, metric in TASKS:
                rows = []
                for model in models:
                    run = here[model]
                    cells = [display_name(model)] + [format_stat(run.summary_stat(g, metric)) for g in ("all", "high", "low")]
                    cells += [format_stat(run.class_stat(c, metric)) for c in classes]
                    rows.append(cells)
                for method, label in PAPER_METHODS.items():
                    if not with_paper:
                        break
                    values = [paper_value(dataset, config, method, metric, g, False)
                              for g in ("all", "high", "low", *classes)]
                    if any(v is not None for v in values):
                        rows.append([label + REPORTED, *(format_reported(v) for v in values)])
                if not rows:
                    continue
                long_tailed = "-LT" if dataset in DATASETS and dataset_info(dataset).paper_benchmark else ""
                title = f"{_title(dataset)}{long_tailed} {config}: {METRIC_TITLES[metric]}, %"
                tables.append(Table(title=title, keys={"dataset": dataset, "config": config, "metric": metric},
                                    columns=["Method", "All", "High", "Low", *classes], rows=rows))
    return tables


def build_leaderboard(runs_dir: Path, dataset: str | None = None, per_class: bool = False,
                      with_paper: bool = False) -> Leaderboard:
    """The leaderboard of the runs under `runs_dir`.

    Parameters: dataset: keep one dataset; per_class: the supplementary layout instead of the
    summary; with_paper: add the paper's published numbers as "(reported)" columns/rows (with
    `dataset` given, the paper's table is shown even without runs).
    Raises `RunError` when there is nothing to show.
    """
    runs_dir = Path(runs_dir)
    show_paper_only = with_paper and dataset is not None and bool(paper_configs(dataset))
    if runs_dir.is_dir() or not show_paper_only:
        runs, notes = collect_runs(runs_dir, dataset)
        notes += missing_value_notes(runs)
    else:
        runs, notes = [], [f"runs folder {runs_dir} does not exist; showing the published numbers only"]
    datasets = sorted({r.dataset for r in runs} | ({dataset} if show_paper_only else set()), key=_dataset_key)
    if not datasets:
        where = f" for dataset {dataset}" if dataset else ""
        raise RunError(f"no finished runs under {runs_dir}{where}; run `ltbench run --model NAME` first")
    if with_paper:
        notes += [f"the paper reports no results for {d}" for d in datasets if not paper_configs(d)]
    groups, group_notes = group_runs(runs, run_sort_key)
    tables = (per_class_tables if per_class else summary_tables)(groups, datasets, with_paper)
    notes += group_notes
    return Leaderboard(tables=tables, notes=notes)


# ----------------------------------------------------------------------------- rendering


def render_markdown(leaderboard: Leaderboard) -> str:
    """The tables as Markdown, each under a `###` title."""
    blocks = []
    for table in leaderboard.tables:
        lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(table.columns))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def render_csv(leaderboard: Leaderboard) -> str:
    """All tables as one CSV: the tables' key columns, then the union of their columns."""
    key_names: list[str] = []
    columns: list[str] = []
    for table in leaderboard.tables:
        key_names += [k for k in table.keys if k not in key_names]
        columns += [c for c in table.columns if c not in columns]
    buffer = _text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*key_names, *columns])
    for table in leaderboard.tables:
        for row in table.rows:
            values = dict(zip(table.columns, row))
            writer.writerow([*(table.keys.get(k, "") for k in key_names), *(values.get(c, "") for c in columns)])
    return buffer.getvalue()


def render(leaderboard: Leaderboard, fmt: str = "md") -> str:
    """Render as "md" or "csv"."""
    if fmt == "md":
        return render_markdown(leaderboard)
    if fmt == "csv":
        return render_csv(leaderboard)
    raise ValueError(f"unknown format {fmt!r}; use md or csv")
