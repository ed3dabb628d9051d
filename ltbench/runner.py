"""fit -> predict -> evaluate -> write the run directory (DESIGN.md, "The run directory").

A run is built in a hidden folder `.<timestamp>.partial` beside its final place and renamed to
`runs/<model>/<dataset>-<config>/<timestamp>/` only when everything is written, so a failed
run never leaves a half-written run directory. The partial folder keeps the training state:
`--resume` continues it. The library reports progress through a `report(line)` callback the
CLI supplies, and tqdm bars; it never prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import shlex
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ltbench import distributed, io
from ltbench.data import RecordTrainSet, evaluation_batches
from ltbench.detector import (
    IMAGE_SIZE,
    DetectorSpec,
    check_prediction,
    check_uniform,
    config_to_dict,
    make_config,
    resolve_detector,
    unscorable_classes,
)
from ltbench.errors import ConfigError, LTBenchError, RunError
from ltbench.evaluation import evaluate
from ltbench.metrics import image_score_from_map
from ltbench.missing import unscored_text
from ltbench.results import write_overlays, write_results
from ltbench.run_config import build_config, choose_device, choose_preset, jsonable
from ltbench.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_DIR,
    locate_partial,
    new_partial_dir,
    read_run_record,
)

DEFAULT_SPLIT = "synth/exp100"
VERSION_PACKAGES = ("ltbench", "torch", "numpy", "pandas", "pillow", "scikit-learn", "scipy", "safetensors",
                    "transformers")

Reporter = Callable[[str], None]


@dataclass(frozen=True)
class RunOptions:
    """What `ltbench run` was asked to do."""

    model: str                           # registered name or package.module:ClassName
    split: str | None = None             # "dataset/config" or a manifest CSV/JSON path; None: synth/exp100
    root: str | None = None              # dataset root (--root); None: $LTBENCH_DATA/<dataset> or the synth copy
    preset: str | None = None            # a key of the detector's PRESETS; None: "quick" on synth/*, else "paper"
    config_file: Path | None = None      # JSON object of config overrides (--config)
    set_values: tuple[str, ...] = ()     # "key=value" overrides (--set), applied last
    out: Path = Path("runs")             # where runs/<model>/<dataset>-<config>/<timestamp>/ goes
    device: str | None = None            # "cpu" or "cuda"; None: cuda when available
    seed: int | None = None              # None: 0, or the resumed run's seed
    resume: Path | None = None           # a partial run folder (or its final path) to continue
    batch_size: int = 16                 # test images per predict() call
    overlays_per_class: int = 3          # overlay PNGs written per class
    progress: bool = True                # show tqdm bars
    report: bool = True                  # write report.html into the finished run directory
    command: str = ""                    # the command line, recorded in config.json

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1; got {self.batch_size}")
        if self.overlays_per_class < 0:
            raise ConfigError(f"overlays per class must be 0 or more; got {self.overlays_per_class}")
        if self.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda; got {self.device!r}")


@dataclass
class RunResult:
    """A finished run."""

    run_dir: Path
    evaluation: Any                      # ltbench.evaluation.Evaluation
    record: dict[str, Any] = field(default_factory=dict)  # what config.json holds


# ----------------------------------------------------------------------------- choices


def is_manifest_path(split: str) -> bool:
    """Whether `--split` names a manifest file rather than a DATASET/CONFIG name."""
    return split.endswith((".csv", ".json")) or Path(split).is_file()


def open_run_split(split: str, root: str | None) -> tuple[Any, Any, str]:
    """Open a split by name ("synth/exp100") or manifest path, verifying its files under the root.

    Returns: (Manifest, Catalog, a sentence saying where the data root came from).
    """
    from ltbench import datasets, splits

    if not is_manifest_path(split) and split.count("/") != 1:
        raise ConfigError(f"--split {split!r} must look like DATASET/CONFIG (e.g. synth/exp100) or be a manifest path")
    manifest, catalog = splits.open_split(split, root)
    _, where = datasets.resolve_root(manifest.dataset, root)
    return manifest, catalog, where


def _synth_generated() -> bool:
    """Whether the built-in synthetic dataset is already generated under $LTBENCH_HOME."""
    from ltbench.datasets import synth

    return synth.is_generated()


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- logging


def resume_command(options: RunOptions, record: dict[str, Any], partial: Path) -> str:
    """The command that continues an interrupted run."""
    parts = ["ltbench", "run", "--model", options.model, "--split", record["split_source"]]
    if options.root is not None:
        parts += ["--root", str(options.root)]
    parts += ["--resume", str(partial)]
    return " ".join(shlex.quote(p) for p in parts)


class RunLog:
    """Sends each line to the reporter and appends it, timestamped, to the run's log.txt."""

    def __init__(self, report: Reporter | None):
        self.report = report
        self.path: Path | None = None
        self.pending: list[str] = []

    def attach(self, path: Path) -> None:
        self.path = path
        for line in self.pending:
            self._write(line)
        self.pending = []

    def _write(self, line: str) -> None:
        assert self.path is not None
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"[{datetime.now().isoformat(timespec='seconds')}] {line}\n")

    def __call__(self, line: str, echo: bool = True) -> None:
        if echo and self.report is not None:
            self.report(line)
        if self.path is None:
            self.pending.append(line)
        else:
            self._write(line)


# ----------------------------------------------------------------------------- the run


@dataclass
class _Plan:
    spec: DetectorSpec
    manifest: Any
    catalog: Any
    config: Any
    record: dict[str, Any]
    device: torch.device
    partial: Path | None = None
    final: Path | None = None


def _check_resume(options: RunOptions, spec: DetectorSpec, stored: dict[str, Any], partial: Path) -> None:
    if stored["detector"] != spec.target:
        raise RunError(f"--resume {partial} is a run of model {stored['model']!r} ({stored['detector']}), "
                       f"but --model is {options.model!r} ({spec.target}); resume with --model {stored['model']}")
    given = options.split
    if given is not None and is_manifest_path(given):
        given = str(Path(given).resolve())
    if given is not None and given not in (stored["split"], stored.get("split_source")):
        raise RunError(f"--resume {partial} is a run on split {stored['split']!r}, but --split is "
                       f"{options.split!r}; resume with --split {stored.get('split_source', stored['split'])}")


def _plan(options: RunOptions, log: RunLog) -> _Plan:
    """Everything checked before a folder is made: model, split, preset, config, device."""
    spec = resolve_detector(options.model)
    stored: dict[str, Any] | None = None
    partial = final = None
    if options.resume is not None:
        partial, final = locate_partial(options.resume)
        stored = read_run_record(partial)
        _check_resume(options, spec, stored, partial)

    split_source = options.split or (stored.get("split_source", stored["split"]) if stored else DEFAULT_SPLIT)
    if split_source.startswith("synth/") and options.root is None and not _synth_generated():
        log("Generating the synthetic dataset (first use only; this takes a minute or two)")
    manifest, catalog, where = open_run_split(split_source, options.root)
    if stored is not None:
        if manifest.name != stored["split"]:
            raise RunError(f"--resume {partial} is a run on split {stored['split']!r}, but {split_source!r} "
                           f"is split {manifest.name!r}; resume with the run's split")
        if manifest.csv_sha256 != stored.get("manifest_csv_sha256"):
            raise RunError(f"the manifest of {manifest.name} changed since {partial} was started "
                           f"(sha256 {stored.get('manifest_csv_sha256')} then, {manifest.csv_sha256} now); "
                           "start a new run")

    if is_manifest_path(split_source):
        split_source = str(Path(split_source).resolve())  # so that --resume works from any folder
    split_why = "from --split" if options.split else ("from the resumed run" if stored else "default")
    log(f"Model: {spec.name}" + (f" ({spec.target})" if spec.target != spec.name else ""))
    log(f"Split: {manifest.name} ({split_why}); data: {where}")
    preset, preset_values, preset_why = choose_preset(spec.cls, manifest.name, options.preset)
    has_seed_field = "seed" in {f.name for f in fields(spec.cls.Config)}
    if options.seed is not None and has_seed_field:  # --seed also seeds the detector (before --config/--set)
        preset_values = {**preset_values, "seed": options.seed}
    requested = build_config(spec.cls, preset_values, options.config_file, options.set_values)
    if options.seed is not None:
        seed = options.seed
    elif stored:
        seed = stored["seed"]
    else:  # the detector's own seed (e.g. UniAD's official 133) also seeds the run
        seed = requested.seed if has_seed_field else 0
    if stored is not None:
        stored_config = make_config(spec.cls.Config, stored["config"])
        explicit = options.preset is not None or options.config_file is not None or options.set_values
        if explicit and jsonable(config_to_dict(requested)) != jsonable(config_to_dict(stored_config)):
            raise RunError(f"--resume {partial}: the run was started with config {stored['config']}; "
                           "resume it without --preset/--config/--set (or with the same values)")
        if options.seed is not None and options.seed != stored["seed"]:
            raise RunError(f"--resume {partial}: the run was started with --seed {stored['seed']}, not {options.seed}")
        config, preset = stored_config, stored.get("preset")
        preset_why = f"{preset} (from the resumed run)"
    else:
        config = requested
    log(f"Preset: {preset_why}")
    if hasattr(config, "backbone"):
        log(f"Backbone: {config.backbone}")
    device, device_why = choose_device(options.device)
    log(f"Device: {device_why}")
    log(f"Seed: {seed}")

    record = {
        "model": spec.name,
        "detector": spec.target,
        "config": jsonable(config_to_dict(config)),
        "preset": preset,
        "split": manifest.name,
        "split_source": split_source,
        "dataset": manifest.dataset,
        "root": str(catalog.root),
        "manifest_csv_sha256": manifest.csv_sha256,
        "source_fingerprint": manifest.source_fingerprint,  # the leaderboard groups seeds of one file list
        "class_order": list(manifest.class_order),
        "high": list(manifest.high),
        "low": list(manifest.low),
        "seed": seed,
        "device": str(device),
        "versions": package_versions(),
        "command": options.command,
        "started": stored["started"] if stored else datetime.now().isoformat(timespec="seconds"),
    }
    return _Plan(spec, manifest, catalog, config, record, device, partial, final)


def run(options: RunOptions, report: Reporter | None = None) -> RunResult:
    """Train a detector on a split, predict its test set, evaluate, and write a run directory.

    Parameters: options: what to run; report: called with each progress line (the CLI prints them).
    Returns: the finished `RunResult`. Raises `LTBenchError` subclasses for bad input; an
    interrupted or failed run keeps its `.partial` folder and reports the `--resume` command.
    """
    main = distributed.info().is_main  # under torchrun / accelerate launch only rank 0 reports and writes
    log = RunLog(report if main else None)
    plan = _plan(options, log)
    current, plan.device = distributed.setup(plan.device)
    if current.enabled:
        log(f"Distributed: {current.world_size} processes ({plan.device.type}); rank 0 writes the run directory")
    if plan.partial is None:
        if main:
            parent = Path(options.out) / plan.spec.directory_name / plan.manifest.name.replace("/", "-")
            plan.partial, plan.final = new_partial_dir(parent)
            io.write_json(plan.partial / CONFIG_FILE, plan.record)
        plan.partial, plan.final = distributed.broadcast((plan.partial, plan.final))
        if main:
            log.attach(plan.partial / LOG_FILE)
        log(f"Run directory: {plan.final} (written in {plan.partial.name} until it is complete)")
    else:
        if main:
            log.attach(plan.partial / LOG_FILE)
        log(f"Resuming {plan.partial} (the run directory will be {plan.final})")
    log(f"Command: {options.command}", echo=False)

    try:
        with model_messages(log):
            evaluation = _train_predict_evaluate(plan, options, log)
    except BaseException as exc:
        if not main:
            raise
        command = resume_command(options, plan.record, plan.partial)
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log(f"Run stopped ({reason}). Its state is kept in {plan.partial}; "
            f"resume with: {command}", echo=not isinstance(exc, LTBenchError))
        if isinstance(exc, LTBenchError):
            raise type(exc)(f"{exc} [the unfinished run is kept in {plan.partial}; after fixing this, "
                            f"resume with: {command}]") from None
        raise

    if main:
        checkpoints = plan.partial / CHECKPOINT_DIR
        if checkpoints.is_dir():  # training state is only needed to resume; the run directory holds the model
            shutil.rmtree(checkpoints)
        if plan.final.exists():
            raise RunError(f"{plan.final} appeared while this run was working; the result stays in {plan.partial}")
        os.rename(plan.partial, plan.final)
        if options.report:  # after the rename: the page shows the run directory as it stays
            from ltbench.report import write_run_report

            page = write_run_report(plan.final)
            if report is not None:
                report(f"Report: {page}")
        if report is not None:
            report(f"Run directory: {plan.final}")
    if current.enabled:
        distributed.barrier()
        distributed.cleanup()
    return RunResult(run_dir=plan.final, evaluation=evaluation, record=plan.record)


MODEL_LOGGER = "ltbench.model"  # detectors log training diagnostics here; the run copies them into log.txt


@contextlib.contextmanager
def model_messages(log: RunLog) -> Iterator[None]:
    """Copy what detectors log to `ltbench.model` (INFO and above) into the run's log, warnings marked."""

    class ToRunLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            prefix = "Warning: " if record.levelno >= logging.WARNING else ""
            log(prefix + record.getMessage())

    logger = logging.getLogger(MODEL_LOGGER)
    handler, level, propagate = ToRunLog(logging.INFO), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # shown once, through the run's log, not again by Python's last-resort handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _train_predict_evaluate(plan: _Plan, options: RunOptions, log: RunLog) -> Any:
    assert plan.partial is not None
    spec, manifest, catalog = plan.spec, plan.manifest, plan.catalog
    seed_everything(plan.record["seed"])
    model_dir = plan.partial / MODEL_DIR
    if model_dir.is_dir():
        log(f"Training had finished; loading the model from {model_dir}")
        detector = spec.cls.load(model_dir)
    else:
        train_set = RecordTrainSet(catalog, manifest, plan.device, plan.partial / CHECKPOINT_DIR,
                                   seed=plan.record["seed"], progress=options.progress and distributed.info().is_main)
        train_set.checkpoint_dir.mkdir(exist_ok=True)
        log(f"Training on {len(train_set)} images of {len(train_set.class_names)} classes")
        detector = spec.cls(plan.config)
        fitted = detector.fit(train_set)
        if fitted is not detector:
            raise RunError(f"{spec.name}.fit() must return self (the detector contract)")
        if distributed.info().is_main:
            staging = plan.partial / f".{MODEL_DIR}.tmp"
            if staging.exists():
                shutil.rmtree(staging)
            detector.save(staging)
            os.rename(staging, model_dir)  # model/ exists only once it is complete
            log(f"Model saved to {model_dir}")
        distributed.barrier()

    unscored = unscorable_classes(detector, list(manifest.class_order), spec.name)
    index = {name: i for i, name in enumerate(manifest.class_order)}
    records = sorted((r for r in catalog.test_records() if r.class_name in index),
                     key=lambda r: (index[r.class_name], r.image))
    if not records:
        raise RunError(f"split {manifest.name} has no test images under {catalog.root}")
    scored = [r for r in records if r.class_name not in unscored]
    if unscored:
        log(f"Not scoring {len(records) - len(scored)} test images of {len(unscored)} classes that {spec.name} "
            f"cannot score (their metrics and the means that include them are N/A): {unscored_text(unscored)}")
    if not scored:
        raise RunError(f"{spec.name} cannot score any class of split {manifest.name}: {unscored_text(unscored)}")
    final_scores, anomaly_maps, masks = _predict_test_set(detector, plan, scored, options)
    if final_scores is None:
        return None  # another rank of a distributed run: rank 0 evaluates and writes
    log(f"Predicted {len(scored)} test images")

    evaluation = evaluate(manifest, scored, final_scores, anomaly_maps, masks, unscored)
    for warning in evaluation.warnings:
        log(f"Warning: {warning}")
    score_of = dict(zip((r.image for r in scored), final_scores))
    all_scores = np.array([score_of.get(r.image, np.nan) for r in records], dtype=np.float64)  # NaN: unscored
    write_results(plan.partial, evaluation, spec.name, manifest.name, records, all_scores,
                  diagnostics=getattr(detector, "diagnostics_", None))
    if anomaly_maps is None:
        written = 0
        log(f"No overlays: {spec.name} is detection-only (it returns no anomaly maps)")
    else:
        written = write_overlays(plan.partial, catalog, manifest.class_order, scored, final_scores, anomaly_maps,
                                 masks, options.overlays_per_class)
    log(f"Wrote metrics, per-class table, {len(records)} image scores and {written} overlays")
    log("Results:\n" + evaluation.format_summary(), echo=False)
    return evaluation


def _predict_test_set(detector: Any, plan: _Plan, records: list, options: RunOptions
                      ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Predict the test images (this process's shard; rank 0 gathers the others).

    Parameters: records: the N test records to score, in order.
    Returns: (image scores (N,), anomaly maps (N, 224, 224) or None for a detection-only
    detector, masks (N, 224, 224) or None likewise); (None, None, None) on ranks other than 0.
    Raises `DetectorError` when the detector gives maps (or scores) for some batches only.
    """
    name, count = plan.spec.name, len(records)
    mine = distributed.shard(range(count))  # this process's test images; all of them in one process
    local_maps: np.ndarray | None = None    # (n, 224, 224), allocated at the first batch with maps
    local_masks: np.ndarray | None = None   # (n, 224, 224)
    image_scores: list[np.ndarray | None] = []
    has_maps: list[bool] = []
    position = 0
    show = options.progress and distributed.info().is_main
    with tqdm(total=len(mine), desc="predict", unit="img", disable=not show) as bar, torch.no_grad():
        for batch in evaluation_batches(plan.catalog, [records[i] for i in mine], plan.manifest.class_order,
                                        options.batch_size):
            size = len(batch.records)
            prediction = detector.predict(batch.images.to(plan.device), batch.class_idx.to(plan.device))
            scores, maps = check_prediction(prediction, size, name)
            has_maps.append(maps is not None)
            if check_uniform(has_maps, "anomaly_maps", name):
                if local_maps is None:
                    local_maps = np.empty((len(mine), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
                    local_masks = np.empty((len(mine), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
                local_maps[position:position + size] = maps.float().numpy()
                local_masks[position:position + size] = batch.masks.numpy()
            image_scores.append(None if scores is None else scores.double().numpy())
            position += size
            bar.update(size)
    if not distributed.info().enabled:
        anomaly_maps, masks = local_maps, local_masks
    else:
        shards = distributed.gather_to_main((mine, local_maps, local_masks, image_scores))
        if not distributed.info().is_main:
            return None, None, None
        localised = check_uniform([shard[1] is not None for shard in shards], "anomaly_maps", name)
        anomaly_maps = np.empty((count, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32) if localised else None
        masks = np.empty((count, IMAGE_SIZE, IMAGE_SIZE), dtype=bool) if localised else None
        for indices, shard_maps, shard_masks, _ in shards:
            if localised:  # padding repeats a few images with identical values
                anomaly_maps[indices] = shard_maps
                masks[indices] = shard_masks
        image_scores = _merge_scores(count, [shard[0] for shard in shards], [shard[3] for shard in shards])
    if not check_uniform([s is not None for s in image_scores], "image_scores", name):
        # the protocol's score: max of the 16x16 average-pooled map (check_prediction ensured maps exist)
        return image_score_from_map(anomaly_maps), anomaly_maps, masks
    return np.concatenate(image_scores), anomaly_maps, masks


def _merge_scores(count: int, indices: list[list[int]], scores: list[list[np.ndarray | None]]
                  ) -> list[np.ndarray | None]:
    """Reassemble per-rank image scores into one array in test-record order ([None] if none were given)."""
    flat = [part for parts in scores for part in parts]
    if any(part is None for part in flat):
        return flat  # all None, or mixed (which the caller reports)
    merged = np.empty(count, dtype=np.float64)
    for rank_indices, parts in zip(indices, scores):
        merged[rank_indices] = np.concatenate(parts)
    return [merged]
