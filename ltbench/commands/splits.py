"""Split commands: make-split, list-splits, show-split, verify."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ltbench.datasets import DATASETS, check_files, dataset_module, open_catalog, resolve_root
from ltbench.errors import DatasetError, SplitError
from ltbench.splits import (
    build_split,
    check_recipe,
    compare_with_pinned,
    describe,
    format_beta,
    format_counts,
    has_file_list,
    list_pinned,
    load_manifest,
    manifest_json_path,
    open_split,
    provenance,
    source_catalog,
)

SHOWN_PATHS = 10  # how many missing/unexpected paths `verify` prints
DATASET_HELP = f"{', '.join(DATASETS[:-1])} or {DATASETS[-1]}."


@click.command("make-split")
@click.option("--dataset", required=True, help=DATASET_HELP)
@click.option("--type", "profile", help="Imbalance profile: exp or step (required unless --from-list).")
@click.option("--beta", type=float, help="Imbalance factor (>= 1): largest / smallest class (required unless --from-list).")
@click.option("--reverse", is_flag=True, help="Reverse the class order (the tail becomes the head).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--root", type=click.Path(path_type=Path),
              help="Dataset root (default: $LTBENCH_DATA/<dataset>; mvtec and visa: the shipped file list).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Manifest CSV to write; the JSON goes beside it (default: splits-out/<dataset>/<config>.csv).")
@click.option("--from-list", "from_list", type=click.Path(path_type=Path),
              help="Pin this list of training images instead of drawing (a CSV with an image column, or one path "
                   "per line), e.g. the LTAD authors' lists; checked against the dataset's file list.")
def make_split(dataset: str, profile: str | None, beta: float | None, reverse: bool, seed: int, root: Path | None,
               out: Path | None, from_list: Path | None) -> None:
    """Build a long-tailed training split of a dataset root (or pin a given image list) and write its manifest."""
    dataset_module(dataset)
    if from_list is not None:
        _make_split_from_list(dataset, from_list, profile, beta, reverse, seed, root, out)
        return
    if profile is None or beta is None:
        raise click.UsageError("give --type and --beta (the recipe), or --from-list FILE (a given image list)")
    check_recipe(profile, beta, seed)
    json_out = manifest_json_path(out) if out is not None else None  # fail before any work
    if root is None and not os.environ.get("LTBENCH_DATA") and has_file_list(dataset):
        # a manifest needs only file names: the shipped official list gives them without the images
        click.echo(f"No root given: building from the official {dataset} file list shipped with LTBench "
                   f"(check a local copy against it with: ltbench verify --dataset {dataset} --root DIR).")
        manifest = build_split(source_catalog(dataset), profile, beta, reverse=reverse, seed=seed)
    else:
        root_path, source = resolve_root(dataset, root)
        click.echo(f"Using {source}.")
        catalog = open_catalog(dataset, root_path)
        manifest = build_split(catalog, profile, beta, reverse=reverse, seed=seed)
        manifest.verify(root_path)
    out = out if out is not None else Path("splits-out") / dataset / f"{manifest.config}.csv"
    json_out = manifest_json_path(out)
    manifest.write(out)
    click.echo(describe(manifest))
    click.echo(format_counts(manifest))
    click.echo(compare_with_pinned(manifest))
    click.echo(provenance(manifest))
    click.echo(f"Wrote {out} and {json_out}.")


def _make_split_from_list(dataset: str, from_list: Path, profile: str | None, beta: float | None, reverse: bool,
                          seed: int, root: Path | None, out: Path | None) -> None:
    """`make-split --from-list`: check every listed path against the dataset's file list and pin the list."""
    from ltbench.split_lists import list_catalog, manifest_from_list

    given = [flag for flag, used in (("--type", profile is not None), ("--beta", beta is not None),
                                     ("--reverse", reverse), ("--seed", seed != 0)) if used]
    if given:
        raise click.UsageError(f"--from-list pins a given list; {', '.join(given)} belong to the recipe: drop them")
    if out is not None:
        manifest_json_path(out)  # fail before any work
    catalog = list_catalog(dataset, root)
    manifest = manifest_from_list(from_list, catalog)
    if root is not None or not has_file_list(dataset):
        manifest.verify(catalog.root)  # the listed images are present under the given root
    out = out if out is not None else Path("splits-out") / dataset / f"{manifest.config}.csv"
    manifest.write(out)
    click.echo(describe(manifest))
    click.echo(format_counts(manifest))
    click.echo(provenance(manifest))
    click.echo(f"Wrote {out} and {manifest_json_path(out)}.")


@click.command("list-splits")
def list_splits() -> None:
    """List every pinned split configuration."""
    click.echo(f"{'split':<22}  {'profile':<7}  {'beta':>5}  {'order':<8}  {'classes':>7}  images")
    for name in list_pinned():
        manifest = load_manifest(name)
        images = "recipe only (built from your copy)" if manifest.recipe_only else str(len(manifest.rows))
        order = "reversed" if manifest.reverse else "default"
        click.echo(f"{name:<22}  {manifest.profile:<7}  {format_beta(manifest.beta):>5}  {order:<8}  "
                   f"{len(manifest.class_order):>7}  {images}")


@click.command("show-split")
@click.argument("name")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw the class distribution (.png/.pdf/.svg).")
def show_split(name: str, plot: Path | None) -> None:
    """Show a split's per-class counts with High/Low groups (NAME: pinned name or manifest path)."""
    manifest = load_manifest(name)
    click.echo(describe(manifest))
    click.echo(format_counts(manifest))
    click.echo(provenance(manifest))
    if manifest.recipe_only:
        click.echo(f"Only the recipe is pinned: build the file list with {manifest.make_split_command()}.")
    else:
        click.echo(f"CSV sha256 {manifest.csv_sha256}; source file list {manifest.source_fingerprint}.")
    if plot is not None:
        from ltbench.plots import plot_class_distribution  # matplotlib only when a plot is asked for

        plot_class_distribution(manifest, plot)
        click.echo(f"Wrote {plot}.")


def _echo_paths(title: str, paths: list[str]) -> None:
    """Print a heading and the first few paths of a list."""
    click.echo(title)
    for path in paths[:SHOWN_PATHS]:
        click.echo(f"  {path}")
    if len(paths) > SHOWN_PATHS:
        click.echo(f"  ... and {len(paths) - SHOWN_PATHS} more")


@click.command("verify")
@click.option("--dataset", required=True, help=DATASET_HELP)
@click.option("--root", type=click.Path(path_type=Path), help="Dataset root (default: $LTBENCH_DATA/<dataset>).")
@click.option("--split", "split_name", help="Also check that every image of this split is present.")
def verify(dataset: str, root: Path | None, split_name: str | None) -> None:
    """Check a dataset root against its file list (missing and unexpected files)."""
    manifest = load_manifest(split_name) if split_name else None
    if manifest is not None and manifest.dataset != dataset:
        raise SplitError(f"split {manifest.name} belongs to {manifest.dataset}, not {dataset}: pass "
                         f"--dataset {manifest.dataset}")
    root_path, source = resolve_root(dataset, root)
    click.echo(f"Using {source}.")
    check = check_files(dataset, root_path)
    click.echo(f"{dataset}: {check.expected} files expected, {check.expected - len(check.missing)} present, "
               f"{len(check.missing)} missing, {len(check.unexpected)} unexpected.")
    if check.unexpected:
        _echo_paths("Unexpected image files (not in the file list; they change splits built with make-split, "
                    "not the pinned ones):", check.unexpected)
    if check.missing:
        _echo_paths("Missing files:", check.missing)
    if split_name:  # a split's own missing files are the more specific error
        opened, _ = open_split(split_name, root_path)
        click.echo(f"Split {opened.name}: all {len(opened.rows)} training images present.")
    if check.missing:
        raise DatasetError(f"{len(check.missing)} of {check.expected} files of {dataset} are missing under "
                           f"{root_path}, e.g. {', '.join(check.missing[:3])}: re-extract the dataset there")


COMMANDS = [make_split, list_splits, show_split, verify]
