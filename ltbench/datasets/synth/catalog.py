"""Reading a generated synth root into a `Catalog`, checked against its stamp file."""

from __future__ import annotations

import os
from pathlib import Path

from ltbench.datasets.base import ANOMALY, NORMAL, Catalog, Record
from ltbench.datasets.synth.classes import CLASS_ORDER, DEFECTS
from ltbench.datasets.synth.spec import STAMP_NAME, SynthSpec, image_name, mask_name, read_stamp
from ltbench.errors import DatasetError


def _png_names(folder: Path) -> set[str]:
    try:
        return {entry.name for entry in os.scandir(folder) if entry.name.endswith(".png")}
    except OSError:
        return set()


def _check_names(folder: Path, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise DatasetError(f"synth: {folder}: {'; '.join(detail)}. The root is damaged: delete it and "
                           "regenerate it (`ensure_generated`).")


def read_catalog(root: str | os.PathLike) -> Catalog:
    """Read a generated synth root into a Catalog, checking its layout against its stamp file.

    Parameters: root: a folder written by `generate` / `ensure_generated`.
    Returns: Catalog("synth", root, class_names in CLASS_ORDER order, records).
    Raises DatasetError naming the first folder whose files differ from what the stamp promises.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"synth: dataset root {root} not found; generate it with `ensure_generated()` "
                           "(the CLI does this on first use of a synth split).")
    stamp = read_stamp(root)
    if stamp is None:
        raise DatasetError(f"synth: {root / STAMP_NAME} is missing or unreadable, so {root} is not a "
                           "generated synth dataset; delete it and regenerate it.")
    try:
        spec = SynthSpec(seed=stamp["seed"], classes=tuple(stamp["classes"]), n_train=stamp["n_train"],
                         n_test_good=stamp["n_test_good"], n_test_per_defect=stamp["n_test_per_defect"])
    except (KeyError, TypeError) as error:
        raise DatasetError(f"synth: {root / STAMP_NAME} lacks a valid field ({error}); regenerate the root.") from None
    if list(spec.classes) != [c for c in CLASS_ORDER if c in spec.classes]:
        raise DatasetError(f"synth: {root / STAMP_NAME} lists classes out of CLASS_ORDER order: {list(spec.classes)}")
    present = {entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")}
    if present != set(spec.classes):
        raise DatasetError(f"synth: {root} holds class folders {sorted(present)}, expected {list(spec.classes)}.")
    records: list[Record] = []
    for class_name in spec.classes:
        base = root / class_name
        expected_layout = {"train": {"good"}, "test": {"good", *DEFECTS[class_name]},
                           "ground_truth": set(DEFECTS[class_name])}
        for split, subfolders in expected_layout.items():
            found = {e.name for e in os.scandir(base / split) if e.is_dir()} if (base / split).is_dir() else set()
            if found != subfolders:
                raise DatasetError(f"synth: {base / split} holds {sorted(found)}, expected {sorted(subfolders)}.")
        counts = {("train", "good"): spec.n_train, ("test", "good"): spec.n_test_good}
        counts.update({("test", d): spec.n_test_per_defect for d in DEFECTS[class_name]})
        for (split, defect), count in counts.items():
            folder = base / split / defect
            _check_names(folder, {f"{i:03d}.png" for i in range(count)}, _png_names(folder))
            for i in range(count):
                if defect == "good":
                    records.append(Record(class_name, split, NORMAL, "good",
                                          image_name(class_name, split, defect, i)))
                else:
                    records.append(Record(class_name, split, ANOMALY, defect,
                                          image_name(class_name, split, defect, i),
                                          mask_name(class_name, defect, i)))
            if defect != "good":
                masks = base / "ground_truth" / defect
                _check_names(masks, {f"{i:03d}_mask.png" for i in range(count)}, _png_names(masks))
    return Catalog(dataset="synth", root=root, class_names=list(spec.classes), records=records)
