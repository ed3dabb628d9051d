"""Writing a synth root: `generate` (atomic, in parallel workers) and `ensure_generated` (the built-in copy)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from ltbench.datasets.synth.classes import CLASS_ORDER, N_MAX, N_TEST_GOOD, N_TEST_PER_DEFECT
from ltbench.datasets.synth.render import render_sample
from ltbench.datasets.synth.spec import (
    DEFAULT_SPEC,
    STAMP_NAME,
    SynthSpec,
    home_root,
    image_name,
    is_generated,
    mask_name,
    read_stamp,
    sample_keys,
)
from ltbench.errors import DatasetError

PNG_COMPRESS_LEVEL = 1           # zlib level: noisy images barely shrink past 1, and 1 is fast


def _write_items(root: str, seed: int, items: list[tuple[str, str, str, int]]) -> int:
    """Render and write a chunk of items under `root` (a worker's job). Returns how many it wrote."""
    for class_name, split, defect, index in items:
        image, mask = render_sample(class_name, split, defect, index, seed)
        path = Path(root, image_name(class_name, split, defect, index))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "RGB").save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        if mask is not None:
            mask_path = Path(root, mask_name(class_name, defect, index))
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_path, format="PNG",
                                                                  compress_level=PNG_COMPRESS_LEVEL)
    return len(items)


def generate(root: str | os.PathLike, seed: int = 0, *, classes: list[str] | tuple[str, ...] | None = None,
             n_train: int = N_MAX, n_test_good: int = N_TEST_GOOD, n_test_per_defect: int = N_TEST_PER_DEFECT,
             workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Generate the dataset into `root`, atomically: built in a temporary folder beside it, then renamed.

    An existing root is replaced only if it is a generated synth root (has a stamp) or empty.

    Parameters: root: target folder; seed: dataset seed; classes: a subset of CLASS_ORDER (default
    all); n_train / n_test_good / n_test_per_defect: images per class (defaults: the built-in
    dataset); workers: parallel workers (default min(2, CPUs) for a full dataset; 1 renders in this
    process; the bytes written do not depend on it);
    progress: called as progress(done, total) after each chunk of images.
    Returns: the root.
    """
    chosen = sorted(CLASS_ORDER if classes is None else classes,
                    key=lambda c: CLASS_ORDER.index(c) if c in CLASS_ORDER else -1)
    spec = SynthSpec(seed=seed, classes=tuple(chosen), n_train=n_train, n_test_good=n_test_good,
                     n_test_per_defect=n_test_per_defect)
    return _generate(Path(root), spec, workers, progress)


def _generate(root: Path, spec: SynthSpec, workers: int | None,
              progress: Callable[[int, int], None] | None) -> Path:
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and read_stamp(root) is None)):
        raise DatasetError(f"synth: {root} exists and is not a generated synth dataset; "
                           "refusing to overwrite it. Remove it or choose another folder.")
    stamp_before = read_stamp(root)
    items = sample_keys(spec)
    if workers is None:           # a pool only pays for itself on more than a few hundred images
        workers = min(2, os.cpu_count() or 1) if len(items) > 300 else 1
    chunks = [items[i:i + 48] for i in range(0, len(items), 48)]
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    except OSError as error:
        raise DatasetError(f"synth: cannot create the dataset in {root.parent} ({error}); choose a writable "
                           "folder (for the built-in copy: set $LTBENCH_HOME).") from None
    try:
        done = 0
        if workers == 1:
            for chunk in chunks:
                done += _write_items(str(temporary), spec.seed, chunk)
                if progress is not None:
                    progress(done, len(items))
        else:
            with _pool(max(1, workers)) as pool:
                futures = [pool.submit(_write_items, str(temporary), spec.seed, chunk) for chunk in chunks]
                for future in as_completed(futures):
                    done += future.result()
                    if progress is not None:
                        progress(done, len(items))
        (temporary / STAMP_NAME).write_text(json.dumps(spec.stamp(), indent=2) + "\n", encoding="utf-8")
        written_meanwhile = stamp_before != spec.stamp() and read_stamp(root) == spec.stamp()
        if not written_meanwhile:                 # else another process has just written the same dataset
            _swap_into_place(temporary, root)
    except OSError as error:
        raise DatasetError(f"synth: writing the dataset beside {root} failed ({error}); nothing was left "
                           "behind. Free some disk space (about 250 MB) or choose another folder.") from None
    except BrokenProcessPool:
        raise DatasetError("synth: a generation worker died (out of memory?); nothing was left behind. "
                           "Retry, or generate with workers=1.") from None
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return root


def _pool(workers: int) -> Executor:
    """Forked processes where that is safe (Linux, no other thread running), else threads.

    Spawned processes would re-run a caller's script that lacks an `if __name__ == "__main__":`
    guard; threads still overlap most of the work, as numpy and Pillow release the GIL.
    """
    if sys.platform == "linux" and threading.active_count() == 1:
        return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork"))
    return ThreadPoolExecutor(max_workers=workers)


def _swap_into_place(temporary: Path, root: Path) -> None:
    """Rename a finished folder onto `root`, moving an old root aside first and deleting it after."""
    for _ in range(5):
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, old / "root")
        try:
            os.replace(temporary, root)
        except OSError:            # another process placed a root in between: move it aside and retry
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise DatasetError(f"synth: could not move the generated dataset into {root}; is another process writing it?")


def _remove_stale_temporaries(root: Path, older_than_s: float = 3600.0) -> None:
    """Delete leftovers of interrupted generations beside `root` (never a recent one: it may be running)."""
    if not root.parent.is_dir():
        return
    now = time.time()
    for entry in root.parent.glob(f".{root.name}.*"):
        if entry.suffix in (".tmp", ".old") and entry.is_dir() and now - entry.stat().st_mtime > older_than_s:
            shutil.rmtree(entry, ignore_errors=True)


def ensure_generated(home: str | os.PathLike | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """The root of the built-in dataset, `<home>/synth`, generated first if missing or out of date.

    Parameters: home: LTBench's cache folder (default `default_home()`); progress: as in `generate`.
    Returns: the root. Raises DatasetError if `<home>/synth` holds something else.
    """
    root = home_root(home)
    if is_generated(home):
        return root
    _remove_stale_temporaries(root)
    return _generate(root, DEFAULT_SPEC, None, progress)
