"""Pin a given list of training images as a split manifest (`ltbench make-split --from-list FILE`).

LTBench's pinned splits are re-creations (the paper's recipe, LTBench's draw). A user who has
other lists, such as the LTAD authors' (Zenodo record 10854201), pins them here so that runs use
exactly those images. Accepted files:

- a CSV whose header has an `image` column (and optionally `class_name`; other columns are ignored);
- otherwise a text file with one image path per line (blank lines and lines starting with `#`
  are skipped).

Each path is matched by its longest tail of whole folders that names a file of the dataset, so
leading folders (`mvtec_anomaly_detection/`, `VisA/`, `./data/`, an absolute path) are ignored;
backslashes count as `/`. VisA paths may use the raw (`<class>/Data/Images/Normal/x.JPG`) or the
converted (`<class>/train/good/x.JPG`) layout. Every path must be a normal training image of the
dataset's file list (the shipped official list for MVTec AD and VisA, the root's catalog
otherwise), listed once; every class of the dataset must have at least one image.

No recipe is applied, so High/Low follow the paper's definition directly ("the half most/least
populated classes", LTAD paper, Sec. 3): classes are ordered by image count, most first, ties in
the dataset's class order; High = the first floor(C/2) classes, Low = the rest.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from ltbench.datasets import NORMAL, Catalog, Record, dataset_module, open_catalog, resolve_root
from ltbench.errors import SplitError
from ltbench.io import sha256_bytes
from ltbench.splits import LIST_PROFILE, Manifest, ManifestRow, has_file_list, manifest_csv_sha256

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def list_catalog(dataset: str, root: str | os.PathLike | None) -> Catalog:
    """The file list a given image list is checked against.

    Parameters: dataset: a dataset name; root: `--root` or None.
    Returns: MVTec AD / VisA: the shipped official file list (the authors' lists name files of the
    official release); other datasets: the root's catalog (`--root`, else `$LTBENCH_DATA/<dataset>`,
    for synth the generated set).
    """
    if has_file_list(dataset):
        return dataset_module(dataset).catalog_from_file_list(Path(root) if root is not None else Path(dataset))
    return open_catalog(dataset, resolve_root(dataset, root)[0])


def read_image_list(path: Path) -> tuple[list[tuple[int, str, str | None]], bytes]:
    """The entries of a list file: (line number, image path as written, class name or None).

    Returns: the entries and the file's bytes (for its sha256). Raises `SplitError` naming the file
    when it is unreadable or a CSV lacks an `image` column.
    """
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise SplitError(f"image list {path} does not exist: pass the path of a CSV (image column) or a text "
                         f"file with one image path per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SplitError(f"image list {path} cannot be read as UTF-8 text ({exc}): pass a CSV (image column) or "
                         f"a text file with one image path per line") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
    header = [field.strip() for field in next(csv.reader([first]), [])]
    if "image" in header:
        reader = csv.DictReader(io.StringIO(text))
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        entries = [(reader.line_num, (row.get("image") or "").strip(), (row.get("class_name") or "").strip() or None)
                   for row in reader if any((value or "").strip() for value in row.values() if isinstance(value, str))]
        return entries, raw
    if path.suffix.lower() == ".csv" and "," in first:
        raise SplitError(f"image list {path} is a CSV without an image column (header: {first.strip()}): name the "
                         f"column of image paths 'image' (optionally add class_name)")
    entries = [(number, line.strip(), None) for number, line in enumerate(lines, start=1)
               if line.strip() and not line.lstrip().startswith("#")]
    return entries, raw


def _tails(image: str) -> Iterator[str]:
    """`image` with 0, 1, 2, ... leading folders removed (backslashes read as `/`, `.` and empty parts dropped)."""
    parts = [part for part in image.replace("\\", "/").split("/") if part not in ("", ".")]
    for start in range(len(parts)):
        yield "/".join(parts[start:])


def _index(catalog: Catalog) -> tuple[dict[str, Record], Callable[[str], str]]:
    """Every record of the catalog by its canonical image path, and the function that makes a path canonical."""
    canonical = getattr(dataset_module(catalog.dataset), "canonical_path", None) or (lambda path: path)
    return {canonical(record.image): record for record in catalog.records}, canonical


def manifest_from_list(list_path: str | os.PathLike, catalog: Catalog, name: str | None = None) -> Manifest:
    """Pin the images named by a list file as a manifest of `catalog.dataset` (profile "list").

    Parameters: list_path: the list (see the module docstring for the accepted forms); catalog: the
    file list to check against (`list_catalog`); name: the configuration is "list-<name>" (default:
    the list file's stem, characters other than letters, digits, `.`, `_`, `-` replaced by `_`).
    Returns: the manifest; rows in class order then image path, High/Low by image count.
    Raises `SplitError` naming the file, the first offending path and the fix.
    """
    list_path = Path(list_path)
    entries, raw = read_image_list(list_path)
    if not entries:
        raise SplitError(f"image list {list_path} holds no image paths: give one training image path per line, or "
                         f"a CSV with an image column")
    by_path, canonical = _index(catalog)
    classes = list(catalog.class_names)
    example = min((r.image for r in catalog.records if r.class_name == classes[0] and r.split == "train"
                   and r.label == NORMAL), default="")  # a path in the form the list should use
    selections: dict[str, list[str]] = {c: [] for c in classes}
    seen: dict[str, int] = {}
    for line, image, class_name in entries:
        if class_name is not None and class_name not in classes:
            raise SplitError(f"{list_path} line {line}: unknown class {class_name!r} for {image}: {catalog.dataset} "
                             f"classes are {', '.join(classes)}")
        record = next((by_path[canonical(tail)] for tail in _tails(image) if canonical(tail) in by_path), None)
        if record is None:
            raise SplitError(f"{list_path} line {line}: {image} is not a file of {catalog.dataset}'s file list: "
                             f"give paths relative to the dataset root (e.g. {example}), or fix the list")
        path = canonical(record.image)
        if record.split != "train" or record.label != NORMAL:
            raise SplitError(f"{list_path} line {line}: {image} is a {record.split} "
                             f"{'normal' if record.label == NORMAL else 'anomalous'} image, not a normal training "
                             f"image: a split lists only normal training images; remove it from the list")
        if class_name is not None and class_name != record.class_name:
            raise SplitError(f"{list_path} line {line}: {image} is an image of class {record.class_name!r}, not "
                             f"{class_name!r}: fix its class_name")
        if path in seen:
            raise SplitError(f"{list_path} line {line}: {image} is listed twice (first on line {seen[path]}): a split "
                             f"draws without replacement; remove the repeat")
        seen[path] = line
        selections[record.class_name].append(path)
    empty = [c for c in classes if not selections[c]]
    if empty:
        raise SplitError(f"image list {list_path} has no image of the {catalog.dataset} classes {', '.join(empty)}: "
                         f"a split keeps at least one image of every class; add them to the list")
    rank = {c: i for i, c in enumerate(classes)}
    order = sorted(classes, key=lambda c: (-len(selections[c]), rank[c]))
    n_high = len(order) // 2
    rows = [ManifestRow(c, image, "high" if i < n_high else "low")
            for i, c in enumerate(order) for image in sorted(selections[c])]
    counts = {c: len(selections[c]) for c in order}
    stem = _UNSAFE_NAME.sub("_", name if name is not None else list_path.stem).strip("_") or "images"
    return Manifest(
        dataset=catalog.dataset, config=f"{LIST_PROFILE}-{stem}", profile=LIST_PROFILE,
        beta=max(counts.values()) / min(counts.values()), reverse=False, seed=0, n_max=max(counts.values()),
        class_order=order, target_counts=dict(counts), counts=counts, high=order[:n_high], low=order[n_high:],
        rows=rows, csv_sha256=manifest_csv_sha256(rows), source_fingerprint=catalog.fingerprint(),
        list_file=list_path.name, list_sha256=sha256_bytes(raw),
    )
