"""Long-tailed training splits: the recipe, manifests (CSV + JSON), pinned splits and `open_split`.

The recipe (DESIGN.md, "Long-tailed split recipe"; LTAD paper, Sec. 3), for a class order
`c_0 ... c_{C-1}`, largest class size `N_max` and imbalance factor `beta >= 1`:

- `exp`:  `n_i = floor(N_max * beta^(-i/(C-1)))`, at least 1
- `step`: `n_i = N_max` for `i < floor(C/2)`, else `floor(N_max / beta)`, at least 1
- reverse: the same counts over the reversed class order
- class `c_i` keeps `min(n_i, available_i)` normal training images, drawn without replacement:
  the candidates are sorted by (canonical) image path, each gets a key from
  `np.random.default_rng([seed, zlib.crc32(class_name)]).random(available_i)`, and the images
  with the `k` smallest keys (stable argsort) are kept. Each class has its own generator, so
  one class's count or presence never changes another class's draw.
- High (majority) = the first `floor(C/2)` classes of the (possibly reversed) order, Low = the rest.

A manifest is `<config>.csv` (`class_name,image,group`, one row per kept image, rows in class
order then image path, LF endings) beside `<config>.json` (recipe, counts, groups, the CSV's
sha256 and the fingerprint of the file list it was built from).

The pinned manifests are re-creations: the paper's recipe with LTBench's own seeded draw. The
authors' own image lists are published separately (Zenodo record 10854201); a manifest can pin
any such list instead (`ltbench.split_lists`, profile "list"), and `provenance` says which kind a
manifest is.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ltbench.datasets import (
    DATASETS,
    Catalog,
    dataset_info,
    dataset_module,
    layout_of,
    open_catalog,
    resolve_root,
)
from ltbench.errors import LTBenchError, SplitError
from ltbench.io import atomic_path, sha256_bytes, write_json
from ltbench.resources import pinned_splits_dir
from ltbench.split_names import LIST_PROFILE, PROFILES, config_name, format_beta, parse_config

RECIPE_VERSION = 1
AUTHORS_LISTS = "Zenodo record 10854201 (https://zenodo.org/records/10854201)"  # LTAD paper, abstract
PINNED_DIR = pinned_splits_dir()  # the checkout's splits/, or the copy inside an installed wheel
CSV_HEADER = ("class_name", "image", "group")
# floor() of the exact recipe value: float rounding may land just below an exact integer
_FLOOR_TOLERANCE = 1e-9


def check_recipe(profile: str, beta: float, seed: int = 0) -> None:
    """Raise `SplitError` for an unknown profile, `beta < 1` (or not finite) or a negative seed."""
    if profile not in PROFILES:
        raise SplitError(f"unknown imbalance profile {profile!r}: use one of {', '.join(PROFILES)}")
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 1:
        raise SplitError(f"imbalance factor beta={beta} is invalid: use a number >= 1 "
                         f"(the paper uses 50, 100, 200 and 500)")
    if not isinstance(seed, int) or seed < 0:
        raise SplitError(f"seed {seed} is invalid: use an integer >= 0 (the pinned splits use 0)")


def target_counts(n_max: int, n_classes: int, profile: str, beta: float) -> list[int]:
    """Per-class image counts of the recipe, before `min(n_i, available_i)`.

    Parameters: n_max: the largest class size; n_classes: C >= 2; profile: "exp" or "step";
    beta: the imbalance factor, >= 1.
    Returns: `[n_0, ..., n_{C-1}]` in class order.
    """
    check_recipe(profile, beta)
    if n_classes < 2:
        raise SplitError(f"a long-tailed split needs at least 2 classes, got {n_classes}: add classes")
    if n_max < 1:
        raise SplitError(f"largest class size {n_max} is invalid: it must be >= 1")
    if profile == "exp":
        values = [n_max * beta ** (-i / (n_classes - 1)) for i in range(n_classes)]
    else:
        values = [n_max if i < n_classes // 2 else n_max / beta for i in range(n_classes)]
    return [max(1, math.floor(v + _FLOOR_TOLERANCE)) for v in values]


def class_generator(seed: int, class_name: str) -> np.random.Generator:
    """The generator that draws one class's images: `default_rng([seed, crc32(class_name)])`."""
    return np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])


def sample_without_replacement(candidates: list[str], k: int, generator: np.random.Generator) -> list[str]:
    """`k` of `candidates` drawn uniformly without replacement, returned sorted.

    Each candidate (in the given order) gets a uniform key; the `k` smallest keys win.
    """
    keys = generator.random(len(candidates))
    chosen = np.argsort(keys, kind="stable")[:k]
    return sorted(candidates[i] for i in chosen)


@dataclass(frozen=True)
class ManifestRow:
    """One selected training image."""

    class_name: str
    image: str          # path relative to the dataset root (canonical layout)
    group: str          # "high" (majority) or "low" (minority)


def _csv_bytes(rows: list[ManifestRow]) -> bytes:
    """The manifest CSV: header, then one row per image, LF line endings."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows((r.class_name, r.image, r.group) for r in rows)
    return buffer.getvalue().encode("utf-8")


def manifest_csv_sha256(rows: list[ManifestRow]) -> str:
    """sha256 of the manifest CSV these rows make (recorded in the JSON, checked on load)."""
    return sha256_bytes(_csv_bytes(rows))


def manifest_json_path(csv_path: str | os.PathLike) -> Path:
    """The JSON beside a manifest CSV; raises `SplitError` unless the path ends in .csv."""
    csv_path = Path(csv_path)
    if csv_path.suffix != ".csv":
        raise SplitError(f"manifest path {csv_path} must end in .csv (the JSON is written beside it)")
    return csv_path.with_suffix(".json")


def _json_text(data: dict) -> str:
    """Manifest JSON exactly as written to disk (the format of `ltbench.io.write_json`)."""
    return json.dumps(data, indent=2) + "\n"


@dataclass(frozen=True)
class Manifest:
    """A long-tailed training split: the recipe, the per-class counts and the selected images.

    A recipe-only manifest (pinned DAGM configurations) has no rows, empty `counts` and no
    `csv_sha256`; `open_split` builds its rows from the user's copy of the dataset.
    """

    dataset: str                     # "mvtec", "visa", "dagm", "synth", "folder"
    config: str                      # "exp100", "step200-reverse", ...
    profile: str                     # "exp" or "step"
    beta: float                      # imbalance factor, >= 1
    reverse: bool                    # class order reversed
    seed: int                        # sampling seed
    n_max: int                       # largest class size used by the recipe
    class_order: list[str]           # after reversal; class_idx indexes this list
    target_counts: dict[str, int]    # n_i of the recipe, before min(n_i, available_i)
    counts: dict[str, int]           # realised counts (empty for a recipe-only manifest)
    high: list[str]                  # majority classes (first floor(C/2) of class_order)
    low: list[str]                   # minority classes (the rest)
    rows: list[ManifestRow]          # selected images, in class order then image path
    csv_sha256: str | None           # sha256 of the CSV bytes; None for a recipe-only manifest
    source_fingerprint: str | None   # Catalog.fingerprint() of the file list the rows were drawn from
    recipe_version: int = RECIPE_VERSION
    list_file: str | None = None     # profile "list": the name of the image list the rows come from
    list_sha256: str | None = None   # profile "list": sha256 of that list file's bytes

    @property
    def from_list(self) -> bool:
        """True when the rows were pinned from a given list of images rather than drawn by the recipe."""
        return self.profile == LIST_PROFILE

    @property
    def name(self) -> str:
        """"<dataset>/<config>", e.g. "mvtec/exp100"."""
        return f"{self.dataset}/{self.config}"

    @property
    def recipe_only(self) -> bool:
        """True when only the recipe is pinned (no file list)."""
        return self.csv_sha256 is None

    def group_of(self, class_name: str) -> str:
        """"high" or "low"; raises `SplitError` for a class the split does not hold."""
        if class_name in self.high:
            return "high"
        if class_name in self.low:
            return "low"
        raise SplitError(f"class {class_name!r} is not in split {self.name}: its classes are "
                         f"{', '.join(self.class_order)}")

    def make_split_command(self) -> str:
        """The `ltbench make-split` command line that rebuilds this split from a root (or from its list)."""
        if self.from_list:
            return f"ltbench make-split --dataset {self.dataset} --from-list {self.list_file or 'FILE'}"
        return (f"ltbench make-split --dataset {self.dataset} --type {self.profile} --beta {format_beta(self.beta)}"
                f"{' --reverse' if self.reverse else ''}{f' --seed {self.seed}' if self.seed else ''} --root DIR")

    def csv_bytes(self) -> bytes:
        """The CSV file's bytes."""
        return _csv_bytes(self.rows)

    def to_json(self) -> dict:
        """The JSON file's content (a list manifest adds `list_file` and `list_sha256`)."""
        data = {
            "dataset": self.dataset,
            "config": self.config,
            "profile": self.profile,
            "beta": int(self.beta) if float(self.beta).is_integer() else self.beta,
            "reverse": self.reverse,
            "seed": self.seed,
            "n_max": self.n_max,
            "class_order": list(self.class_order),
            "target_counts": dict(self.target_counts),
            "counts": dict(self.counts) if not self.recipe_only else None,
            "high": list(self.high),
            "low": list(self.low),
            "recipe_version": self.recipe_version,
            "csv_sha256": self.csv_sha256,
            "source_fingerprint": self.source_fingerprint,
        }
        if self.from_list:
            data.update(list_file=self.list_file, list_sha256=self.list_sha256)
        return data

    def write(self, csv_path: str | os.PathLike) -> None:
        """Write `<name>.csv` and `<name>.json` atomically (only the JSON for a recipe-only manifest)."""
        csv_path = Path(csv_path)
        json_path = manifest_json_path(csv_path)
        if self.recipe_only:
            write_json(json_path, self.to_json())
            return
        with atomic_path(csv_path) as csv_tmp, atomic_path(json_path) as json_tmp:
            csv_tmp.write_bytes(self.csv_bytes())
            json_tmp.write_text(_json_text(self.to_json()), encoding="utf-8")

    def local_images(self, root: str | os.PathLike) -> list[str]:
        """The rows' image paths as named under `root` (e.g. a converted VisA layout)."""
        images = [r.image for r in self.rows]
        module = dataset_module(self.dataset)
        return list(module.localize_paths(Path(root), images)) if hasattr(module, "localize_paths") else images

    def localized(self, root: str | os.PathLike) -> Manifest:
        """This manifest with its rows' paths named as under `root`; the recipe and hash are unchanged."""
        images = self.local_images(root)
        rows = [replace(row, image=image) for row, image in zip(self.rows, images)]
        return replace(self, rows=rows)

    def verify(self, root: str | os.PathLike) -> None:
        """Raise `SplitError` (count and first few) if any selected image is missing under `root`."""
        if self.recipe_only:
            raise SplitError(f"split {self.name} pins only the recipe: build its file list with "
                             f"{self.make_split_command()}, or open it with open_split")
        root = Path(root)
        images = self.local_images(root)
        missing = [image for image in images if not (root / image).is_file()]
        if missing:
            raise SplitError(f"{len(missing)} of {len(images)} training images of split {self.name} are missing "
                             f"under {root}, e.g. {', '.join(missing[:3])}: point --root at the full dataset "
                             f"(check it with: ltbench verify --dataset {self.dataset} --root {root})")


def _order_and_targets(base_order: list[str], reverse: bool, n_max: int, profile: str,
                       beta: float) -> tuple[list[str], list[int]]:
    """The (possibly reversed) class order and the recipe's target count of each position."""
    order = list(reversed(base_order)) if reverse else list(base_order)
    return order, target_counts(n_max, len(order), profile, beta)


def _manifest(dataset: str, profile: str, beta: float, reverse: bool, seed: int, n_max: int, order: list[str],
              targets: list[int], selections: dict[str, list[str]] | None,
              source_fingerprint: str | None) -> Manifest:
    """Assemble a manifest from the class order, targets and, per class, the selected images (None: recipe only)."""
    n_high = len(order) // 2
    rows: list[ManifestRow] = []
    if selections is not None:
        for i, class_name in enumerate(order):
            group = "high" if i < n_high else "low"
            rows.extend(ManifestRow(class_name, image, group) for image in selections[class_name])
    return Manifest(
        dataset=dataset, config=config_name(profile, beta, reverse, seed), profile=profile, beta=float(beta),
        reverse=reverse, seed=seed, n_max=n_max, class_order=order, target_counts=dict(zip(order, targets)),
        counts={c: len(selections[c]) for c in order} if selections is not None else {},
        high=order[:n_high], low=order[n_high:], rows=rows,
        csv_sha256=manifest_csv_sha256(rows) if selections is not None else None,
        source_fingerprint=source_fingerprint,
    )


def build_split(catalog: Catalog, profile: str, beta: float, reverse: bool = False, seed: int = 0) -> Manifest:
    """Apply the recipe to a catalog's normal training images.

    Parameters: catalog: a dataset root read by its module; profile: "exp" or "step";
    beta: imbalance factor >= 1; reverse: reverse the class order; seed: sampling seed.
    Returns: the manifest (rows in class order then image path). `N_max` is the dataset's
    paper value where it has one, else its largest class.
    """
    check_recipe(profile, beta, seed)
    module = dataset_module(catalog.dataset)
    canonical = getattr(module, "canonical_path", None)
    candidates = {c: sorted(canonical(r.image) if canonical else r.image for r in catalog.train_normals(c))
                  for c in catalog.class_names}
    for class_name, images in candidates.items():
        if not images:
            raise SplitError(f"class {class_name!r} has no normal training images under {catalog.root}: add "
                             f"some (for {catalog.dataset}: expected {layout_of(catalog.dataset)}) or remove the class")
    n_max = dataset_info(catalog.dataset).n_max or max(len(images) for images in candidates.values())
    order, targets = _order_and_targets(list(catalog.class_names), reverse, n_max, profile, beta)
    selections = {
        c: sample_without_replacement(candidates[c], min(n, len(candidates[c])), class_generator(seed, c))
        for c, n in zip(order, targets)
    }
    return _manifest(catalog.dataset, profile, beta, reverse, seed, n_max, order, targets, selections,
                     catalog.fingerprint())


def recipe_manifest(dataset: str, profile: str, beta: float, reverse: bool = False, seed: int = 0) -> Manifest:
    """A recipe-only manifest (class order and target counts) from a dataset's paper order and `N_MAX`."""
    check_recipe(profile, beta, seed)
    info = dataset_info(dataset)
    if not info.n_max or not info.class_order:
        raise SplitError(f"dataset {dataset!r} has no fixed class order and N_max: build its split from a "
                         f"root with ltbench make-split --dataset {dataset} --root DIR")
    order, targets = _order_and_targets(list(info.class_order), reverse, info.n_max, profile, beta)
    return _manifest(dataset, profile, beta, reverse, seed, info.n_max, order, targets, None, None)


def _pinned_sort_key(name: str) -> tuple:
    dataset, config = name.split("/", 1)
    try:
        profile, beta, reverse, seed = parse_config(config)
    except SplitError:
        profile, beta, reverse, seed = config, 0.0, False, 0
    rank = DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS)
    return rank, dataset, profile, reverse, beta, seed


def list_pinned() -> list[str]:
    """Every pinned split name ("mvtec/exp100", ...), by dataset, profile, order and beta."""
    if not PINNED_DIR.is_dir():
        return []
    names = [f"{d.name}/{j.stem}" for d in PINNED_DIR.iterdir() if d.is_dir() for j in d.glob("*.json")]
    return sorted(names, key=_pinned_sort_key)


def _manifest_paths(name_or_path: str | os.PathLike) -> tuple[Path, Path]:
    """(csv path, json path) of a pinned name or a manifest path; raises `SplitError` if unknown."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.suffix in (".csv", ".json"):
        if not path.with_suffix(".json").is_file():
            raise SplitError(f"manifest {path.with_suffix('.json')} does not exist: pass a manifest written by "
                             f"ltbench make-split, or a pinned split name (see ltbench list-splits)")
        return path.with_suffix(".csv"), path.with_suffix(".json")
    pinned = list_pinned()
    if text in pinned:
        json_path = PINNED_DIR / f"{text}.json"
        return json_path.with_suffix(".csv"), json_path
    dataset = text.split("/", 1)[0]
    same = [n for n in pinned if n.startswith(f"{dataset}/")]
    if same and "/" in text:
        raise SplitError(f"split {text!r} is not pinned: pinned {dataset} splits are {', '.join(same)}; build other "
                         f"configurations with ltbench make-split --dataset {dataset} --type exp|step --beta B")
    raise SplitError(f"unknown split {text!r}: use a pinned split ({', '.join(pinned)}) or the path of a "
                     f"manifest .csv written by ltbench make-split")


def _parse_rows(data: bytes, csv_path: Path) -> list[ManifestRow]:
    """Rows of a manifest CSV; raises `SplitError` naming the file on a bad header or group."""
    reader = csv.reader(io.StringIO(data.decode("utf-8")))
    header = next(reader, None)
    if tuple(header or ()) != CSV_HEADER:
        raise SplitError(f"{csv_path} does not start with the header {','.join(CSV_HEADER)}: rebuild it with "
                         f"ltbench make-split")
    rows = []
    for number, fields in enumerate(reader, start=2):
        if len(fields) != 3 or fields[2] not in ("high", "low"):
            raise SplitError(f"{csv_path} line {number} is not class_name,image,high|low: rebuild it with "
                             f"ltbench make-split")
        rows.append(ManifestRow(*fields))
    return rows


_JSON_KEYS = ("dataset", "config", "profile", "beta", "reverse", "seed", "n_max", "class_order", "target_counts",
              "counts", "high", "low", "recipe_version", "csv_sha256", "source_fingerprint")


def load_manifest(name_or_path: str | os.PathLike) -> Manifest:
    """Load a pinned split ("visa/exp200") or a manifest written by `Manifest.write` (its .csv or .json).

    Checks the CSV's sha256 against the JSON and the per-class counts against the rows;
    raises `SplitError` naming the file and the fix.
    """
    csv_path, json_path = _manifest_paths(name_or_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        missing_keys = [k for k in _JSON_KEYS if k not in data]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise SplitError(f"{json_path} is not a manifest JSON ({exc}): restore it or rebuild it with "
                         f"ltbench make-split") from exc
    if missing_keys:
        raise SplitError(f"{json_path} lacks the keys {', '.join(missing_keys)}: rebuild it with ltbench make-split")
    if data["recipe_version"] != RECIPE_VERSION:
        raise SplitError(f"{json_path} uses recipe version {data['recipe_version']}, this LTBench implements "
                         f"version {RECIPE_VERSION}: rebuild it with ltbench make-split or upgrade LTBench")
    rows: list[ManifestRow] = []
    if data["csv_sha256"] is not None:
        if not csv_path.is_file():
            raise SplitError(f"{csv_path} is missing (its JSON {json_path.name} expects it): restore it or rebuild "
                             f"the manifest with ltbench make-split")
        raw = csv_path.read_bytes()
        actual = sha256_bytes(raw)
        if actual != data["csv_sha256"]:
            raise SplitError(f"{csv_path} does not match the sha256 recorded in {json_path.name} (expected "
                             f"{data['csv_sha256'][:12]}..., found {actual[:12]}...): the CSV was changed; restore "
                             f"it or rebuild the manifest with ltbench make-split")
        rows = _parse_rows(raw, csv_path)
        realised = {c: 0 for c in data["class_order"]}
        for row in rows:
            realised[row.class_name] = realised.get(row.class_name, 0) + 1
        if realised != data["counts"]:
            raise SplitError(f"{csv_path} rows do not add up to the counts in {json_path.name}: rebuild the "
                             f"manifest with ltbench make-split")
    return Manifest(
        dataset=data["dataset"], config=data["config"], profile=data["profile"], beta=float(data["beta"]),
        reverse=bool(data["reverse"]), seed=int(data["seed"]), n_max=int(data["n_max"]),
        class_order=list(data["class_order"]), target_counts=dict(data["target_counts"]),
        counts=dict(data["counts"] or {}), high=list(data["high"]), low=list(data["low"]), rows=rows,
        csv_sha256=data["csv_sha256"], source_fingerprint=data["source_fingerprint"],
        recipe_version=data["recipe_version"], list_file=data.get("list_file"), list_sha256=data.get("list_sha256"),
    )


def open_split(name: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[Manifest, Catalog]:
    """Everything a training run needs: the split's manifest and its dataset's catalog.

    Parameters: name: a pinned split ("mvtec/exp100") or a manifest path; root: the dataset
    root (`--root`), else `$LTBENCH_DATA/<dataset>` (for synth, the generated copy).
    Returns: (manifest, catalog). The manifest's row paths are named as under the root (a
    converted VisA root gets converted paths); for a recipe-only pin (DAGM) the rows are built
    from the root with the pinned recipe. Raises `SplitError`/`DatasetError` if files are missing.
    """
    manifest = load_manifest(name)
    root_path, _ = resolve_root(manifest.dataset, root)
    catalog = open_catalog(manifest.dataset, root_path)
    if manifest.recipe_only:
        built = build_split(catalog, manifest.profile, manifest.beta, manifest.reverse, manifest.seed)
        if built.class_order != manifest.class_order or built.target_counts != manifest.target_counts:
            raise SplitError(f"the recipe of {manifest.name} (class order and target counts) does not match what "
                             f"this LTBench builds: reinstall LTBench")
        return built, catalog
    manifest.verify(catalog.root)
    return manifest.localized(catalog.root), catalog


def has_file_list(dataset: str) -> bool:
    """Whether LTBench ships the official file list of `dataset` (MVTec AD, VisA): its splits need no root."""
    return hasattr(dataset_module(dataset), "catalog_from_file_list")


def source_catalog(dataset: str) -> Catalog:
    """The catalog a pinned split of `dataset` is built from: the shipped file list, or the generated synth set."""
    module = dataset_module(dataset)
    if has_file_list(dataset):
        return module.catalog_from_file_list(Path(dataset))
    if dataset == "synth":
        return module.read_catalog(module.ensure_generated())
    raise SplitError(f"dataset {dataset!r} has no public file list: only recipes are pinned for it")


def rebuild_pinned(name: str) -> Manifest:
    """Rebuild a pinned split from its source (file list, generated set, or recipe for DAGM)."""
    dataset, config = name.split("/", 1)
    if dataset not in DATASETS or config not in dataset_info(dataset).pinned_configs:
        pinned = [f"{d}/{c}" for d in DATASETS for c in dataset_info(d).pinned_configs]
        raise SplitError(f"{name} is not a pinned configuration: pinned ones are {', '.join(pinned)}")
    profile, beta, reverse, seed = parse_config(config)
    if dataset_info(dataset).recipe_only:
        return recipe_manifest(dataset, profile, beta, reverse, seed)
    return build_split(source_catalog(dataset), profile, beta, reverse, seed)


def write_pinned(datasets: tuple[str, ...] = ("mvtec", "visa", "dagm")) -> list[str]:
    """(Maintainers) rebuild and write every pinned split of `datasets` into `PINNED_DIR`; returns the names."""
    names = [f"{d}/{c}" for d in datasets for c in dataset_info(d).pinned_configs]
    for name in names:
        rebuild_pinned(name).write(PINNED_DIR / f"{name}.csv")
    return names


def compare_with_pinned(manifest: Manifest) -> str:
    """One sentence saying whether a built manifest equals the pinned one of the same name."""
    if manifest.name not in list_pinned():
        return f"No pinned manifest for {manifest.name}."
    try:
        pinned = load_manifest(manifest.name)
    except LTBenchError as exc:
        return f"The pinned manifest {manifest.name} could not be read: {exc}"
    if pinned.recipe_only:
        if pinned.class_order != manifest.class_order or pinned.target_counts != manifest.target_counts:
            return f"Differs from the pinned recipe {manifest.name} (class order or target counts)."
        short = [c for c in manifest.class_order if manifest.counts.get(c, 0) < manifest.target_counts[c]]
        tail = (f"; {', '.join(short)} kept fewer images than the target (all they have)" if short else "")
        return f"Matches the pinned recipe {manifest.name} (class order and target counts){tail}."
    if pinned.csv_sha256 == manifest.csv_sha256:
        return f"Matches the pinned manifest {manifest.name} (sha256 {manifest.csv_sha256[:12]})."
    reason = ("the root's file list differs from the one the pinned split was built from"
              if pinned.source_fingerprint != manifest.source_fingerprint else "the selected images differ")
    return (f"Differs from the pinned manifest {manifest.name}: {reason}; train on the pinned split "
            f"{manifest.name} to compare with published numbers.")


def format_counts(manifest: Manifest) -> str:
    """The per-class table: index, class, group, target count and realised count (multi-line string)."""
    width = max([len("class")] + [len(c) for c in manifest.class_order])
    lines = [f"{'#':>3}  {'class':<{width}}  group  target  count"]
    for i, class_name in enumerate(manifest.class_order):
        count = "-" if manifest.recipe_only else str(manifest.counts[class_name])
        lines.append(f"{i:>3}  {class_name:<{width}}  {manifest.group_of(class_name):<5}  "
                     f"{manifest.target_counts[class_name]:>6}  {count:>5}")
    total = "-" if manifest.recipe_only else str(len(manifest.rows))
    lines.append(f"{'':>3}  {'total':<{width}}  {'':<5}  {sum(manifest.target_counts.values()):>6}  {total:>5}")
    return "\n".join(lines)


def describe(manifest: Manifest) -> str:
    """A one-line summary of a manifest's recipe (or, for a list manifest, of its list)."""
    if manifest.from_list:
        return (f"{manifest.name}: pinned from the image list {manifest.list_file} (sha256 "
                f"{(manifest.list_sha256 or '')[:12]}), {len(manifest.class_order)} classes ({len(manifest.high)} "
                f"high, {len(manifest.low)} low), largest / smallest class {manifest.beta:.4g}")
    order = "reversed class order" if manifest.reverse else "class order"
    return (f"{manifest.name}: {manifest.profile} profile, beta {format_beta(manifest.beta)}, {order}, seed "
            f"{manifest.seed}, N_max {manifest.n_max}, {len(manifest.class_order)} classes "
            f"({len(manifest.high)} high, {len(manifest.low)} low)")


def provenance(manifest: Manifest) -> str:
    """Where a manifest's images come from, in one or two sentences (printed by `show-split` and `make-split`).

    A pinned split of a paper dataset is a re-creation (the paper's recipe, LTBench's draw), not the
    authors' lists; a list manifest names its list and how High/Low were assigned.
    """
    if manifest.from_list:
        return (f"Images pinned from the list {manifest.list_file} (sha256 {manifest.list_sha256}); no recipe was "
                f"applied. High = the {len(manifest.high)} classes with the most images, Low = the rest (ties in the "
                f"dataset's class order), the paper's 'half most/least populated classes' (Sec. 3).")
    drawn = (f"the paper's recipe (Sec. 3: {manifest.profile}, beta {format_beta(manifest.beta)}"
             f"{', reversed order' if manifest.reverse else ''}) with LTBench's own draw (seed {manifest.seed})")
    if manifest.dataset not in DATASETS or not dataset_info(manifest.dataset).paper_benchmark:
        return f"Built by {drawn}."
    if manifest.recipe_only:
        drawn = f"the paper's recipe with LTBench's own draw (seed {manifest.seed}, made from your copy of the data)"
    what = "pinned split" if manifest.name in list_pinned() else "split"
    return (f"This {what} is a re-creation of the LTAD paper's {manifest.dataset} {manifest.profile}"
            f"{format_beta(manifest.beta)}{'-reverse' if manifest.reverse else ''} split: {drawn}, not the "
            f"authors' image lists. With a few images per Low class, which images are drawn moves the Low numbers; "
            f"the authors' lists are in {AUTHORS_LISTS}: pin one with ltbench make-split --dataset "
            f"{manifest.dataset} --from-list FILE.")
