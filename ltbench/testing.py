"""Conformance check for detectors, and a small in-memory `TrainSet` to run it on.

`check_detector(cls, train_set)` asserts everything the runner relies on (DESIGN.md, "The
detector contract"); detector authors call it from their tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ltbench import distributed
from ltbench.detector import (
    IMAGE_SIZE,
    TrainSet,
    check_prediction,
    unscorable_classes,
    validate_detector_class,
)
from ltbench.errors import DetectorError, LTBenchError


class TensorTrainSet:
    """A `TrainSet` over images held in memory (for tests and the conformance check).

    Under torchrun each rank gets its interleaved shard of every pass, as the contract asks
    (`len()` is this rank's share, `total` the whole set).
    """

    def __init__(self, images: Tensor, class_idx: Tensor, class_names: list[str], checkpoint_dir: Path,
                 device: torch.device | str = "cpu"):
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}); got {tuple(images.shape)}")
        self.images = images.float()       # (N, 3, 224, 224) in [0, 1]
        self.class_idx = class_idx.long()  # (N,)
        self.class_names = list(class_names)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)  # the runner hands fit() an existing folder too
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(distributed.shard(range(len(self.images))))

    @property
    def total(self) -> int:
        """The number of training images over all ranks."""
        return len(self.images)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (images (B, 3, 224, 224), class_idx (B,)) in a seeded order (this rank's shard under torchrun)."""
        order = torch.randperm(self.total, generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(self.total)
        order = torch.tensor(distributed.shard(order.tolist()), dtype=torch.int64)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            yield self.images[chosen], self.class_idx[chosen]


def pattern_images(n_classes: int = 2, per_class: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Small structured images: each class a distinct colour gradient plus mild noise.

    Returns: (images (n_classes * per_class, 3, 224, 224) in [0, 1], class_idx (N,) int64).
    """
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.0, 1.0, IMAGE_SIZE)
    images, labels = [], []
    for c in range(n_classes):
        base = torch.stack([ramp.view(1, -1).expand(IMAGE_SIZE, IMAGE_SIZE) * (c + 1) / (n_classes + 1),
                            ramp.view(-1, 1).expand(IMAGE_SIZE, IMAGE_SIZE),
                            torch.full((IMAGE_SIZE, IMAGE_SIZE), (c + 0.5) / n_classes)])
        for _ in range(per_class):
            noise = 0.05 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            images.append((base + noise).clamp(0, 1))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _fail(cls: type, what: str) -> DetectorError:
    return DetectorError(f"{cls.__module__}.{cls.__qualname__} fails the detector contract: {what}")


def _predict(detector: Any, images: Tensor, class_idx: Tensor, cls: type) -> tuple[Tensor | None, Tensor | None]:
    with torch.no_grad():
        prediction = detector.predict(images, class_idx)
    try:
        return check_prediction(prediction, len(images), cls.__qualname__)
    except DetectorError as exc:
        raise _fail(cls, str(exc)) from None


def _same(a: tuple[Tensor | None, Tensor | None], b: tuple[Tensor | None, Tensor | None]) -> bool:
    """Equal predictions: each part is None in both, or equal tensors."""
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


def _expect_load_error(cls: type, directory: Path, change: str) -> None:
    try:
        cls.load(directory)
    except LTBenchError:
        return
    except Exception as exc:  # noqa: BLE001 - any other exception type is itself the failure reported
        raise _fail(cls, f"load() of a model directory with {change} raised {type(exc).__name__} ({exc}); "
                         "it must raise an LTBenchError (e.g. DetectorError)") from None
    raise _fail(cls, f"load() accepted a model directory with {change}; load must be strict")


def _check_strict_load(cls: type, saved: Path, scratch: Path) -> None:
    """Tamper with copies of the saved directory: an unknown config key, an extra and a missing tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    config_path = saved / "config.json"
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict):
        raise _fail(cls, "save() must write config.json holding a JSON object")

    unknown_key = scratch / "unknown_key"
    shutil.copytree(saved, unknown_key)
    (unknown_key / "config.json").write_text(json.dumps({**config, "not_a_config_key": 1}))
    _expect_load_error(cls, unknown_key, "an unknown key in config.json")

    weights = sorted(saved.glob("*.safetensors"))
    extra = scratch / "extra_tensor"
    shutil.copytree(saved, extra)
    tensors = load_file(str(extra / weights[0].name))
    save_file({**tensors, "not_a_weight": torch.zeros(1)}, str(extra / weights[0].name))
    _expect_load_error(cls, extra, f"an unknown tensor in {weights[0].name}")

    for weight_file in weights:
        tensors = load_file(str(weight_file))
        if tensors:
            missing = scratch / f"missing_{weight_file.stem}"
            shutil.copytree(saved, missing)
            dropped = min(tensors)
            save_file({k: v for k, v in tensors.items() if k != dropped}, str(missing / weight_file.name))
            _expect_load_error(cls, missing, f"tensor {dropped!r} missing from {weight_file.name}")
            break


def check_detector(cls: type, train_set: TrainSet, config: Any = None, images: Tensor | None = None,
                   class_idx: Tensor | None = None, work_dir: Path | None = None) -> Any:
    """Check that `cls` meets the detector contract on `train_set`; raise `DetectorError` saying what fails.

    Checks, in order: the contract's members exist; `Config` is a frozen dataclass whose fields
    all have defaults; `__init__` stores the config; `predict` before `fit` raises
    `DetectorError`; `fit` returns self; `unscorable_classes_`, if the detector has it, maps
    classes of the training set to reasons; `predict` returns a `Prediction` with image scores
    (B,) or None and anomaly maps (B, 224, 224) or None (detection only), not both None,
    floating point and finite, the same on a second call, and maps (or None) for a one-image
    batch too; `save` writes config.json and *.safetensors only; `load` gives identical
    predictions and the same unscorable classes, and rejects an unknown config key, an unknown
    tensor and a missing tensor.

    Parameters: cls: the detector class; train_set: what `fit` trains on; config: the config to
    use (default `cls.Config()`); images, class_idx: a batch to predict on (default: the first
    batch of `train_set`, at most 4 images; images of classes the detector cannot score are
    dropped before predicting); work_dir: where to save (default a temporary folder).
    Returns: the fitted detector.
    """
    validate_detector_class(cls)
    config_cls = cls.Config
    params = getattr(config_cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise _fail(cls, "Config must be a frozen dataclass (@dataclass(frozen=True))")
    no_default = [f.name for f in dataclasses.fields(config_cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if no_default:
        raise _fail(cls, f"every Config field needs a default; {', '.join(no_default)} has none")
    config = config if config is not None else config_cls()

    detector = cls(config)
    if not any(value is config for value in vars(detector).values()):
        raise _fail(cls, "__init__(config) must store the config it is given (e.g. self.config = config)")

    if images is None or class_idx is None:
        images, class_idx = next(iter(train_set.batches(min(4, len(train_set)), shuffle=False)))
    try:
        detector.predict(images, class_idx)
    except DetectorError:
        pass
    except Exception as exc:  # noqa: BLE001 - the wrong exception type is the failure reported
        raise _fail(cls, f"predict before fit raised {type(exc).__name__} ({exc}); it must raise DetectorError") from None
    else:
        raise _fail(cls, "predict before fit returned a result; it must raise DetectorError")

    fitted = detector.fit(train_set)
    if fitted is not detector:
        raise _fail(cls, "fit() must return self")
    try:
        unscored = unscorable_classes(detector, list(train_set.class_names), cls.__qualname__)
    except DetectorError as exc:
        raise _fail(cls, str(exc)) from None
    scorable = torch.tensor([train_set.class_names[int(i)] not in unscored for i in class_idx], dtype=torch.bool)
    if not bool(scorable.any()):
        raise _fail(cls, f"the batch to predict holds only classes it cannot score ({', '.join(unscored)}); "
                         "give check_detector images of a class it can score")
    images, class_idx = images[scorable], class_idx[scorable]
    first = _predict(detector, images, class_idx, cls)
    if not _same(first, _predict(detector, images, class_idx, cls)):
        raise _fail(cls, "predict() gives different results for the same input; it must be deterministic in eval")
    single = _predict(detector, images[:1], class_idx[:1], cls)
    for part, label in ((0, "image_scores"), (1, "anomaly_maps")):
        if (first[part] is None) != (single[part] is None):
            raise _fail(cls, f"predict() returns {label} for a batch of {len(images)} but "
                             f"{'None' if single[part] is None else 'a tensor'} for a batch of 1; "
                             f"it must return {label} for every batch or for none")

    with tempfile.TemporaryDirectory(dir=work_dir) as scratch_name:
        scratch = Path(scratch_name)
        saved = scratch / "model"
        detector.save(saved)
        files = sorted(p.name for p in saved.iterdir()) if saved.is_dir() else []
        if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
            raise _fail(cls, f"save() must write config.json and *.safetensors into the directory; wrote {files}")
        others = [name for name in files if not name.endswith((".json", ".safetensors"))]
        if others:
            raise _fail(cls, f"save() may write only JSON and safetensors files (no pickle); also wrote {others}")
        loaded = cls.load(saved)
        if not isinstance(loaded, cls):
            raise _fail(cls, f"load() must return a {cls.__qualname__}; got {type(loaded).__name__}")
        if not _same(first, _predict(loaded, images, class_idx, cls)):
            raise _fail(cls, "a saved and loaded detector predicts differently from the original")
        if unscorable_classes(loaded, list(train_set.class_names), cls.__qualname__) != unscored:
            raise _fail(cls, "a saved and loaded detector has other unscorable_classes_ than the original; "
                             "save them (e.g. in the Meta)")
        _check_strict_load(cls, saved, scratch)
    return detector


# ----------------------------------------------------------------------------- training matters

@contextlib.contextmanager
def optimizer_steps_undone() -> Iterator[list[int]]:
    """Within the block every `torch.optim` step leaves the parameters as they were: an untrained control.

    Works for any detector trained through a torch optimizer without knowing its config (a zero
    learning rate is not always allowed, and weight decay or momentum would still move the
    weights): a global pre-step hook copies each parameter, a post-step hook writes the copy back.
    Everything else of `fit` (data pass, random draws, saved state) runs as usual.
    Yields: a one-element list counting the undone steps (0 after `fit` means no optimizer was used).
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    undone = [0]
    before: dict[int, list[Tensor]] = {}

    def keep(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        before[id(optimizer)] = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]

    def restore(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        kept = before.pop(id(optimizer))
        with torch.no_grad():
            for parameter, value in zip((p for group in optimizer.param_groups for p in group["params"]), kept):
                parameter.copy_(value)
        undone[0] += 1

    handles = [register_optimizer_step_pre_hook(keep), register_optimizer_step_post_hook(restore)]
    try:
        yield undone
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class NoveltyTask:
    """Two classes, each the training set of one direction; the other class's content is the anomaly.

    Trained on class d, a detector must score pixels and images drawn from class 1 − d above those of
    class d. A detector whose scores do not depend on its training data (an untrained network)
    ranks the same pixels the same way in both directions, and the labels of one direction are
    the complement of the other's, so its two AUROCs sum to 1 (ties aside): averaged over the two
    directions it is at chance, whatever its features. Only what was learned from the training
    class lifts both directions.
    """

    class_names: tuple[str, str]         # synth classes, one per direction
    train_images: tuple[Tensor, Tensor]  # per class (N, 3, 224, 224) in [0, 1]
    test_images: Tensor                  # (T, 3, 224, 224) in [0, 1]: whole images of both classes, then composites
    test_source: Tensor                  # (T, 224, 224) int64: the class (0 or 1) each pixel was drawn from
    whole: Tensor                        # (T,) bool: drawn from one class only (these are scored at image level)


def _synth_tensor(class_name: str, split: str, index: int) -> Tensor:
    from ltbench.datasets import synth

    image, _ = synth.render_sample(class_name, split, "good", index)  # (224, 224, 3) uint8
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0  # (3, 224, 224)


def novelty_task(class_names: tuple[str, str] = ("weave", "grain"), n_train: int = 12, n_whole: int = 3,
                 n_composite: int = 3, patch: int = 96, seed: int = 0) -> NoveltyTask:
    """Build a `NoveltyTask` from normal images of the built-in synthetic dataset (rendered, nothing written).

    Parameters: class_names: two synth classes; n_train: training images per class (synth train
    indices 0…); n_whole: whole test images per class; n_composite: composites per class, an image of
    that class with a patch×patch square at a seeded position cut from an image of the other class;
    seed: the generator of the square positions.
    Returns: the task (n_whole and n_composite images per class; test images are synth test normals).
    """
    assert len(class_names) == 2 and class_names[0] != class_names[1], "two distinct synth classes"
    train = tuple(torch.stack([_synth_tensor(name, "train", i) for i in range(n_train)]) for name in class_names)
    generator = torch.Generator().manual_seed(seed)
    images, sources, whole = [], [], []
    for c, name in enumerate(class_names):
        for i in range(n_whole):
            images.append(_synth_tensor(name, "test", i))
            sources.append(torch.full((IMAGE_SIZE, IMAGE_SIZE), c, dtype=torch.int64))
            whole.append(True)
    for c, name in enumerate(class_names):
        other = class_names[1 - c]
        for i in range(n_composite):
            image = _synth_tensor(name, "test", n_whole + i)
            cut = _synth_tensor(other, "test", n_whole + n_composite + i)
            row, col = torch.randint(0, IMAGE_SIZE - patch + 1, (2,), generator=generator).tolist()
            image[:, row:row + patch, col:col + patch] = cut[:, row:row + patch, col:col + patch]
            source = torch.full((IMAGE_SIZE, IMAGE_SIZE), c, dtype=torch.int64)
            source[row:row + patch, col:col + patch] = 1 - c
            images.append(image)
            sources.append(source)
            whole.append(False)
    return NoveltyTask(tuple(class_names), train, torch.stack(images), torch.stack(sources), torch.tensor(whole))


@dataclass(frozen=True)
class TrainingMatters:
    """What `check_training_matters` measured: AUROCs averaged over the two directions, and per direction.

    `pixel_auroc` is None for a detection-only detector (no anomaly maps): not applicable, not zero.
    """

    trained: dict[str, float | None]        # {"image_auroc", "pixel_auroc"}, mean of the two directions
    control: dict[str, float | None]        # the same for the untrained control
    trained_by_direction: list[dict[str, float | None]]
    control_by_direction: list[dict[str, float | None]]
    control_steps_undone: int               # optimizer steps the control took and undid (> 0)

    def __str__(self) -> str:
        def shown(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        return (f"trained image {shown(self.trained['image_auroc'])} pixel {shown(self.trained['pixel_auroc'])}; "
                f"control image {shown(self.control['image_auroc'])} pixel {shown(self.control['pixel_auroc'])}")


def _novelty_aurocs(detector: Any, task: NoveltyTask, direction: int) -> dict[str, float | None]:
    """Image and pixel AUROC of a detector trained on class `direction` of the task (pixel None without maps)."""
    from ltbench.metrics import image_score_from_map, roc_auc

    class_idx = torch.zeros(len(task.test_images), dtype=torch.int64)  # the detector knows one class: index 0
    with torch.no_grad():
        scores, maps = check_prediction(detector.predict(task.test_images, class_idx), len(task.test_images),
                                        type(detector).__qualname__)
    if scores is None:  # the protocol's image score from the maps (DESIGN.md, "Evaluation protocol")
        scores = torch.from_numpy(image_score_from_map(maps))
    anomalous = task.test_source != direction  # (T, 224, 224)
    image_labels = anomalous[task.whole].flatten(1).any(1)
    return {"image_auroc": roc_auc(scores[task.whole].numpy(), image_labels.numpy()),
            "pixel_auroc": None if maps is None else roc_auc(maps.flatten().numpy(), anomalous.flatten().numpy())}


def check_training_matters(cls: type, config: Any, task: NoveltyTask, margin: float = 0.2,
                           chance_band: float | None = 0.15, work_dir: Path | None = None) -> TrainingMatters:
    """Train `cls(config)` on each direction of `task`, and an untrained control the same way with every
    optimizer step undone; raise `DetectorError` unless training is what makes it detect anomalies.

    Passes when, averaged over the two directions, the control's image and pixel AUROC lie within
    `chance_band` of 0.5 and the trained detector's are at least `margin` above the control's.
    A control whose scores do not depend on the training data is at 0.5 by construction (see
    `NoveltyTask`); the band catches a "control" that still learns from the data (a memory bank,
    statistics), for which the comparison with chance is not the right one. A margin of 0.2 asks the
    trained detector to order a random anomalous/normal pair correctly 70% of the time instead of
    50%; the quick presets of UniAD and LTAD clear it on the default task (measured values in
    tests/test_quality.py).

    `chance_band=None` is for a detector whose untrained control legitimately estimates statistics
    of the training data besides its optimizer steps (Cut & Paste's Gaussian density on the
    embeddings, RegAD's per-position Gaussians of the support features, the running statistics
    of BatchNorm layers updated by the control's forward passes): that control is not at chance
    by construction. The trained detector must then be `margin` above the better of the control
    and chance, so the margin measures what the gradient training adds over those statistics, and
    a control that the statistics put below chance cannot make a chance-level detector pass.
    A detection-only detector (`anomaly_maps` None) is judged on image AUROC alone; its pixel
    AUROC is reported as None (not applicable).

    Parameters: cls: a detector class trained through a torch optimizer; config: its config (sized
    for a test); task: from `novelty_task()`; margin, chance_band: in AUROC (chance_band None: no
    chance requirement on the control); work_dir: where the checkpoint folders go (default a
    temporary folder).
    Returns: the measured `TrainingMatters`.
    """
    trained, control, steps = [], [], 0
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch_name:
        scratch = Path(scratch_name)
        for direction in (0, 1):
            images = task.train_images[direction]
            class_idx = torch.zeros(len(images), dtype=torch.int64)
            names = [task.class_names[direction]]
            detector = cls(config).fit(TensorTrainSet(images, class_idx, names, scratch / f"trained{direction}"))
            trained.append(_novelty_aurocs(detector, task, direction))
            with optimizer_steps_undone() as undone:
                detector = cls(config).fit(TensorTrainSet(images, class_idx, names, scratch / f"control{direction}"))
            steps += undone[0]
            control.append(_novelty_aurocs(detector, task, direction))
    if steps == 0:
        raise _fail(cls, "fit() took no torch optimizer step, so an untrained control cannot be built; "
                         "check_training_matters is for gradient-trained detectors")
    keys = ("image_auroc", "pixel_auroc")
    runs = trained + control
    scored = [k for k in keys if all(run[k] is not None for run in runs)]  # pixel: only with anomaly maps
    mixed = [k for k in keys if k not in scored and any(run[k] is not None for run in runs)]
    if mixed:
        raise _fail(cls, "predict() returned anomaly maps for some of the four fits and None for others; "
                         "it must return them always or never")
    result = TrainingMatters({k: (trained[0][k] + trained[1][k]) / 2 if k in scored else None for k in keys},
                             {k: (control[0][k] + control[1][k]) / 2 if k in scored else None for k in keys},
                             trained, control, steps)
    if chance_band is None:  # no band: the margin is over the better of the control and chance
        problems = [f"trained {k} {result.trained[k]:.3f} is not {margin} above the better of the control's "
                    f"{result.control[k]:.3f} and chance (0.5)"
                    for k in scored if result.trained[k] < max(result.control[k], 0.5) + margin]
    else:
        problems = [f"the untrained control's {k} is {result.control[k]:.3f}, not within {chance_band} of chance"
                    for k in scored if abs(result.control[k] - 0.5) > chance_band]
        problems += [f"trained {k} {result.trained[k]:.3f} is not {margin} above the control's {result.control[k]:.3f}"
                     for k in scored if result.trained[k] < result.control[k] + margin]
    if problems:
        raise DetectorError(f"{cls.__qualname__}: training does not make it detect anomalies on the novelty task "
                            f"({result}): " + "; ".join(problems))
    return result


class Interrupted(Exception):
    """Raised by `interrupt_training` to stop a fit as Ctrl-C would, right after a training state was saved."""


def interrupt_training(monkeypatch: Any, stop: Any) -> None:
    """Make every `TrainingProgress.save` (pytest `monkeypatch`) raise `Interrupted` once `stop(values)` is true.

    Parameters: stop: called with the plain values of each saved state (e.g. `epoch_losses`, `phase`, `epoch`).
    Resume tests use it to cut a fit after a given epoch; `monkeypatch.undo()` lets the next fit run through.
    """
    from ltbench.training import TrainingProgress

    save = TrainingProgress.save

    def save_then_stop(self, modules, **values):
        save(self, modules, **values)
        if stop(values):
            raise Interrupted

    monkeypatch.setattr(TrainingProgress, "save", save_then_stop)
