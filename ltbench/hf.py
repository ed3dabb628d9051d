"""LTBench splits as 🤗 `datasets`: `load_split` (a cached `DatasetDict`) and `export_split` (parquet + card).

`load_split("visa/exp200", root)` gives `train` (the manifest's selected images) and `test` (the
dataset's whole test set) with the features of `split_features`. Images are stored by path in
the library's cache (nothing is copied); masks are binarised (non-zero -> 255) and stored as PNG
bytes, so VisA's defect-id masks, which look black, decode to visible 0/255 masks.

`export_split` writes `data/{train,test}-NNNNN-of-NNNNN.parquet` with the image bytes embedded,
the manifest, and a dataset card (README.md with YAML metadata) that names the source dataset's
licence and citation and how the split was made; `push_to_hub` uploads such a folder.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ltbench import __version__
from ltbench.datasets import dataset_info
from ltbench.datasets.base import NORMAL, Catalog
from ltbench.errors import DatasetError, DependencyError, LTBenchError, SplitError
from ltbench.io import atomic_path, write_text
from ltbench.splits import Manifest, format_beta, load_manifest, open_split, provenance

try:  # the [hub] extra: a plain `pip install ltbench` has no `datasets` (nor its pyarrow and yaml)
    import datasets
    import pyarrow.parquet as pq
    import yaml
    from datasets.table import embed_table_storage
except ModuleNotFoundError as _exc:
    raise DependencyError(f"the Hugging Face commands need the package {_exc.name!r}: install them with "
                          f"pip install 'ltbench[hub]'") from None

LABEL_NAMES = ["normal", "anomaly"]   # index = Record.label (NORMAL = 0, ANOMALY = 1)
GROUP_NAMES = ["high", "low"]         # majority / minority classes
FORMAT_VERSION = 1                    # bump when the rows the generator yields change: it keys the cache
ROWS_PER_ROW_GROUP = 64               # parquet row group size: images are large, keep groups small
DEFAULT_MAX_SHARD_BYTES = 500 * 2**20  # the Hub's usual parquet shard size
LTAD_CITATION = (
    "@inproceedings{ho2024ltad,\n"
    "  title     = {Long-Tailed Anomaly Detection with Learnable Class Names},\n"
    "  author    = {Ho, Chih-Hui and Peng, Kuan-Chuan and Vasconcelos, Nuno},\n"
    "  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},\n"
    "  year      = {2024}\n"
    "}\n"
)


class HubError(LTBenchError):
    """Pushing to the Hugging Face Hub failed (no token, offline, refused)."""


def split_features(manifest: Manifest) -> datasets.Features:
    """The features of both splits: `class_name` follows the split's class order (class_idx indexes it)."""
    return datasets.Features({
        "image": datasets.Image(),
        "mask": datasets.Image(),                       # None for normal images
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "class_name": datasets.ClassLabel(names=list(manifest.class_order)),
        "group": datasets.ClassLabel(names=GROUP_NAMES),
        "defect_type": datasets.Value("string"),        # "good" for normal images
        "path": datasets.Value("string"),               # image path relative to the dataset root
    })


def _split_rows(manifest: Manifest, catalog: Catalog) -> dict[str, list[dict]]:
    """Plain rows per split (paths relative to the root): the generator's input and the cache key."""
    by_image = {record.image: record for record in catalog.records}
    position = {name: i for i, name in enumerate(manifest.class_order)}

    def row(record, group: str) -> dict:
        return {"image": record.image, "mask": record.mask, "label": record.label,
                "class_name": record.class_name, "group": group, "defect_type": record.defect_type}

    train = []
    for selected in manifest.rows:
        record = by_image.get(selected.image)
        if record is None or record.split != "train" or record.label != NORMAL:
            raise SplitError(f"split {manifest.name} selects {selected.image}, which the {catalog.dataset} "
                             f"catalog of {catalog.root} does not list as a normal training image: use the "
                             f"root the split was built for")
        train.append(row(record, selected.group))
    test = [row(record, manifest.group_of(record.class_name))
            for record in sorted((r for r in catalog.records if r.split == "test" and r.class_name in position),
                                 key=lambda r: (position[r.class_name], r.image))]
    return {"train": train, "test": test}


def binary_mask_png(path: Path) -> bytes:
    """A mask file as PNG bytes of a mode-L image: 255 where any channel is non-zero, else 0.

    Parameters: path: the mask file (0/255 masks, VisA's defect-type ids, RGB masks all work).
    Returns: the encoded PNG, same size as the source mask.
    """
    try:
        with Image.open(path) as mask:
            values = np.asarray(mask)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"mask {path} cannot be read ({exc}): restore it from the dataset download") from exc
    if values.ndim == 3:
        values = values.any(axis=2)
    buffer = io.BytesIO()
    Image.fromarray(np.where(values != 0, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _generate_examples(root: str, rows: list[dict], manifest_sha256: str | None, format_version: int):
    """Yield one example per row. `manifest_sha256` and `format_version` are unused here: they are
    part of `gen_kwargs` only so that the library's cache key changes with the manifest and format."""
    for row in rows:
        mask = None
        if row["mask"] is not None:
            mask = {"bytes": binary_mask_png(Path(root) / row["mask"]), "path": row["mask"]}
        yield {
            "image": {"path": os.path.join(root, row["image"]), "bytes": None},
            "mask": mask,
            "label": row["label"],
            "class_name": row["class_name"],
            "group": row["group"],
            "defect_type": row["defect_type"],
            "path": row["image"],
        }


def _dataset_dict(manifest: Manifest, catalog: Catalog, cache_dir: str | os.PathLike | None) -> datasets.DatasetDict:
    features = split_features(manifest)
    root = str(Path(catalog.root).resolve())
    splits = {}
    for split, rows in _split_rows(manifest, catalog).items():
        splits[split] = datasets.Dataset.from_generator(
            _generate_examples, features=features, split=datasets.NamedSplit(split),
            cache_dir=None if cache_dir is None else str(cache_dir),
            gen_kwargs={"root": root, "rows": rows, "manifest_sha256": manifest.csv_sha256,
                        "format_version": FORMAT_VERSION},
        )
    return datasets.DatasetDict(splits)


def load_split(name: str | os.PathLike, root: str | os.PathLike | None = None, *,
               cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """A split as a `datasets.DatasetDict` with `train` (the manifest's images) and `test` (all test images).

    Built on first use with `Dataset.from_generator` and cached by `datasets` (keyed by the root,
    the manifest's sha256 and the rows), so later calls load from the cache.

    Parameters: name: a pinned split ("visa/exp200") or a manifest path; root: the dataset root
        (else `$LTBENCH_DATA/<dataset>`); cache_dir: the `datasets` cache (default `HF_DATASETS_CACHE`).
    Returns: the `DatasetDict`; features as in `split_features` (image, mask, label, class_name,
        group, defect_type, path). Raises `SplitError`/`DatasetError` when files are missing.
    """
    manifest, catalog = open_split(name, root)
    return _dataset_dict(manifest, catalog, cache_dir)


# --------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    """What `export_split` wrote."""

    out: Path                                               # the export folder
    split: str                                              # "visa/exp200"
    num_rows: dict[str, int] = field(default_factory=dict)  # rows per split
    shards: dict[str, list[Path]] = field(default_factory=dict)  # parquet files per split


def _shard_count(rows: list[dict], root: Path, max_shard_bytes: int) -> int:
    """Parquet shards for a split, from the size of its files on disk."""
    total = sum((root / row["image"]).stat().st_size + ((root / row["mask"]).stat().st_size if row["mask"] else 0)
                for row in rows)
    return max(1, min(len(rows), math.ceil(total / max_shard_bytes)))


def _write_parquet(dataset: datasets.Dataset, path: Path) -> None:
    """Write a dataset as one parquet file with the image files' bytes embedded (atomically)."""
    schema = dataset.features.arrow_schema   # carries the features, so ClassLabel/Image survive a reload
    table_view = dataset.with_format("arrow")
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema)
        try:
            for start in range(0, len(dataset), ROWS_PER_ROW_GROUP):
                table = embed_table_storage(table_view[start:start + ROWS_PER_ROW_GROUP])
                writer.write_table(table.cast(schema))
        finally:
            writer.close()


def _features_yaml(features: datasets.Features) -> list[dict]:
    """The `dataset_info.features` list of a dataset card for these features."""
    entries = []
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            dtype = {"class_label": {"names": {str(i): label for i, label in enumerate(feature.names)}}}
        elif isinstance(feature, datasets.Image):
            dtype = "image"
        else:
            dtype = feature.dtype
        entries.append({"name": name, "dtype": dtype})
    return entries


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return label
    return "100K<n<1M"


def dataset_card(manifest: Manifest, result: ExportResult, features: datasets.Features,
                 repo_id: str | None = None) -> str:
    """README.md of an export: YAML metadata (configs, features, licence, provenance) and a description.

    Parameters: manifest: the split exported; result: the rows and shards written; features: their
        features; repo_id: the Hub repository, for the usage snippet (None: the local folder).
    Returns: the card's text.
    """
    terms = dataset_info(manifest.dataset)
    split_bytes = {s: sum(p.stat().st_size for p in paths) for s, paths in result.shards.items()}
    metadata = {
        "license": terms.licence_id,
        "pretty_name": f"LTBench {manifest.name}: long-tailed {terms.title.split(' (')[0]}",
        "task_categories": ["image-classification", "image-segmentation"],
        "tags": ["anomaly-detection", "long-tailed", "industrial-inspection", "ltbench"],
        "size_categories": [_size_category(sum(result.num_rows.values()))],
        "configs": [{"config_name": "default", "data_files": [
            {"split": split, "path": f"data/{split}-*"} for split in result.shards]}],
        "dataset_info": {
            "features": _features_yaml(features),
            "splits": [{"name": split, "num_bytes": split_bytes[split], "num_examples": result.num_rows[split]}
                       for split in result.shards],
            "download_size": sum(split_bytes.values()),
        },
        "ltbench": {
            "split": manifest.name, "dataset": manifest.dataset, "profile": manifest.profile,
            "beta": float(manifest.beta), "reverse": manifest.reverse, "seed": manifest.seed,
            "n_max": manifest.n_max, "recipe_version": manifest.recipe_version,
            "manifest_sha256": manifest.csv_sha256, "source_fingerprint": manifest.source_fingerprint,
            "ltbench_version": __version__,
        },
    }
    header = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000)
    beta = format_beta(manifest.beta)
    order = "reversed paper class order" if manifest.reverse else "class order"
    formula = ("n_i = floor(N_max · β^(-i/(C-1))), at least 1" if manifest.profile == "exp"
               else "n_i = N_max for i < floor(C/2), else floor(N_max / β), at least 1")
    recipe = "" if manifest.from_list else f"""- Profile `{manifest.profile}`, imbalance factor β = {beta}, {order}, seed {manifest.seed},
  N_max = {manifest.n_max}, recipe version {manifest.recipe_version}: {formula}.
- Each class keeps min(n_i, available) normal training images, drawn uniformly without replacement
  with a seeded generator; High (majority) classes are the first floor(C/2) of the order, Low the rest.
"""
    counts = "\n".join(f"| {i} | {c} | {manifest.group_of(c)} | {manifest.target_counts[c]} | "
                       f"{manifest.counts.get(c, '-')} |" for i, c in enumerate(manifest.class_order))
    source = repo_id or str(result.out)
    citation = "\n".join(part for part in (terms.citation, LTAD_CITATION) if part)
    return f"""---
{header}---

# LTBench {manifest.name}

A long-tailed training split of **{terms.title}** for multi-class unsupervised anomaly detection,
made with LTBench {__version__}, following the benchmark of the
LTAD paper (Ho et al., CVPR 2024). `train` holds the split's {result.num_rows.get('train', 0)} selected
normal images; `test` holds the dataset's whole test set ({result.num_rows.get('test', 0)} images, never
resampled).

## Licence

The images and masks are those of {terms.title}, distributed under **{terms.licence}**
({terms.homepage}). This export changes nothing but the selection of training images and the
mask encoding (binarised to 0/255), and is subject to the same terms.

## How the split was made

{recipe}- {provenance(manifest)}
- Manifest `manifest/{manifest.config}.csv` (sha256 `{manifest.csv_sha256}`), built from the file list
  with fingerprint `{manifest.source_fingerprint}`.

| # | class | group | target | kept |
| --- | --- | --- | --- | --- |
{counts}

## Fields

| field | type | meaning |
| --- | --- | --- |
| image | Image | the image file's bytes, unchanged |
| mask | Image | ground-truth mask, 0 = normal, 255 = anomalous; None for normal images |
| label | ClassLabel | {', '.join(LABEL_NAMES)} |
| class_name | ClassLabel | the split's class order (its index is the class index) |
| group | ClassLabel | high (majority) or low (minority) |
| defect_type | string | defect folder/type, "good" for normal images |
| path | string | image path relative to the source dataset root |

## Use

```python
import datasets

splits = datasets.load_dataset("{source}")
example = splits["test"][0]          # example["image"], example["mask"]: PIL images
```

## Citation

```bibtex
{citation}```
"""


def export_split(name: str | os.PathLike, out: str | os.PathLike, root: str | os.PathLike | None = None, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, cache_dir: str | os.PathLike | None = None,
                 repo_id: str | None = None) -> ExportResult:
    """Write a split as parquet shards with embedded images, its manifest, and a dataset card. Offline.

    Parameters: name: a pinned split or a manifest path; out: the export folder (earlier LTBench
        shards in `out/data` are replaced); root: the dataset root; max_shard_bytes: the largest
        shard, estimated from the files' sizes on disk; cache_dir: the `datasets` cache; repo_id:
        the Hub repository it will be pushed to (only used in the card's usage snippet).
    Returns: an `ExportResult` (rows and parquet files per split).
    """
    manifest, catalog = open_split(name, root)
    splits = _dataset_dict(manifest, catalog, cache_dir)
    rows = _split_rows(manifest, catalog)
    out = Path(out)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob("*-of-*.parquet"):   # shards of an earlier export (another shard count)
        stale.unlink()
    result = ExportResult(out=out, split=manifest.name)
    for split, dataset in splits.items():
        n_shards = _shard_count(rows[split], Path(catalog.root), max_shard_bytes)
        result.num_rows[split] = len(dataset)
        result.shards[split] = []
        for index in range(n_shards):
            path = data_dir / f"{split}-{index:05d}-of-{n_shards:05d}.parquet"
            _write_parquet(dataset.shard(num_shards=n_shards, index=index, contiguous=True), path)
            result.shards[split].append(path)
    # the manifest with its paths as pinned (so that its sha256 matches); where only the recipe is
    # pinned (DAGM), the one built from this root
    pinned = load_manifest(name)
    (manifest if pinned.recipe_only else pinned).write(out / "manifest" / f"{manifest.config}.csv")
    write_text(out / "README.md", dataset_card(manifest, result, splits["train"].features, repo_id))
    return result


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Upload an export folder to a 🤗 Hub dataset repository (created if needed).

    The token comes from `HF_TOKEN` or `hf auth login`; it is never printed or written.

    Parameters: folder: an `export_split` folder; repo_id: "user/name"; private: create the repo private.
    Returns: the URL of the commit.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it (the export itself is "
                       f"complete in {folder})")
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again "
                       f"(the export itself is complete in {folder})")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="dataset",
                                   commit_message=f"LTBench {__version__} export",
                                   delete_patterns=["data/*.parquet"])
    except (HfHubHTTPError, HTTPError, OfflineModeIsEnabled, OSError, ValueError) as exc:
        message = (str(exc).replace(token, "***").splitlines() or [type(exc).__name__])[0]
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = {401: "; the token was refused: check it with `hf auth whoami`",
                403: f"; the token may not write to {repo_id}: use a token with write access"}.get(status, "")
        raise HubError(f"pushing {folder} to the dataset repo {repo_id} failed: {message}{hint} "
                       f"(the export itself is complete in {folder})") from None
    return commit.commit_url
