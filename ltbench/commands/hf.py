"""Commands `ltbench download` (fetch a public dataset) and `ltbench export-hf` (a split as 🤗 parquet).

Thin shells: parse, print the licence line, call `ltbench.download` / `ltbench.hf`, print the result.
`ltbench.hf` imports `datasets`, which is slow to import, so it is imported only when needed.
"""

from __future__ import annotations

from pathlib import Path

import click

from ltbench.datasets import dataset_info
from ltbench.download import (
    archive_sources,
    download_dataset,
    download_root,
    downloadable_datasets,
    parse_checksums,
)


@click.command("download")
@click.argument("dataset", type=click.Choice(sorted(downloadable_datasets())))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to extract the dataset into [default: $LTBENCH_DATA/<dataset>].")
@click.option("--url", default=None,
              help="A mirror: the archive's URL, file:// URL or local path (for dagm: a base URL or folder "
                   "holding Class1.zip ... Class10.zip).")
@click.option("--sha256", "checksums", multiple=True, metavar="[FILE=]HEX",
              help="Expected sha256 of an archive, overriding the pinned one; FILE=HEX for dagm. Repeatable.")
@click.option("--keep-archives", is_flag=True, help="Keep the archives in <root>/.downloads after extracting.")
@click.option("--retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many cut connections to resume (HTTP Range) before giving up.")
@click.option("--verify-files/--no-verify-files", default=True, show_default=True,
              help="Check the root against the dataset's file list afterwards.")
def download_command(dataset: str, root: Path | None, url: str | None, checksums: tuple[str, ...],
                     keep_archives: bool, retries: int, verify_files: bool) -> None:
    """Download, verify (sha256) and safely extract MVTec AD, VisA or DAGM 2007.

    An interrupted download resumes when the same command is run again.
    """
    target = download_root(dataset, root)
    pinned_by_user = parse_checksums(dataset, checksums)
    sources = archive_sources(dataset, url, pinned_by_user)
    click.echo(dataset_info(dataset).licence_line())
    if any(source.sha256 is None for source in sources):
        click.echo(f"No checksum is pinned for the {dataset} archives: their sha256 and md5 are printed "
                   f"below for you to compare with {dataset_info(dataset).homepage}.")
    click.echo(f"Downloading {len(sources)} archive(s) into {target} ...")
    report = download_dataset(dataset, target, url=url, checksums=pinned_by_user, keep_archives=keep_archives,
                              retries=retries, verify_files=verify_files)
    for archive in report.archives:
        done = "already extracted" if archive.files is None else f"{archive.files} files extracted"
        if archive.pinned:
            click.echo(f"{archive.filename}: sha256 {archive.sha256} verified, {done}")
        else:
            click.echo(f"{archive.filename}: sha256 {archive.sha256} md5 {archive.md5} NOT verified "
                       f"(no checksum pinned), {done}")
    if report.unpinned:
        click.echo("To pin these checksums next time: "
                   + " ".join(f"--sha256 {a.filename}={a.sha256}" for a in report.unpinned))
    if verify_files:
        extra = f"; {report.unexpected_files} further images not in the list" if report.unexpected_files else ""
        click.echo(f"All {report.files_checked} files of the {dataset} file list are in {target}{extra}.")
    click.echo(f"Use it with --root {target}" + (" (or set LTBENCH_DATA)" if root is not None else ""))


@click.command("export-hf")
@click.option("--split", "split_name", required=True,
              help="A pinned split (visa/exp200) or the path of a manifest .csv.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The dataset root [default: $LTBENCH_DATA/<dataset>].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write data/*.parquet, manifest/ and README.md into.")
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO",
              help="Also upload the folder to this 🤗 Hub dataset repo (token from HF_TOKEN or `hf auth login`).")
@click.option("--private", is_flag=True, help="Create the Hub repo as private (with --push-to-hub).")
@click.option("--max-shard-mb", type=click.IntRange(min=1), default=500, show_default=True,
              help="Largest parquet shard, in MiB of source files.")
def export_hf_command(split_name: str, root: Path | None, out: Path, repo_id: str | None, private: bool,
                      max_shard_mb: int) -> None:
    """Export a split as 🤗 parquet shards with a dataset card; optionally push it to the Hub."""
    from ltbench import hf  # imports `datasets`: slow, so only when this command runs

    if private and repo_id is None:
        raise click.UsageError("--private only applies with --push-to-hub REPO")
    result = hf.export_split(split_name, out, root, max_shard_bytes=max_shard_mb * 2**20, repo_id=repo_id)
    dataset = result.split.split("/", 1)[0]
    click.echo(f"Exported {result.split} to {out}: "
               + ", ".join(f"{split} {rows} rows in {len(result.shards[split])} shard(s)"
                           for split, rows in result.num_rows.items()))
    click.echo(f"The images stay under their source licence: {dataset_info(dataset).licence_line()}")
    if repo_id is not None:
        click.echo(f"Pushing to the dataset repo {repo_id}{' (private)' if private else ''} ...")
        url = hf.push_to_hub(out, repo_id, private=private)
        click.echo(f"Pushed: {url}")


COMMANDS = [download_command, export_hf_command]
