"""`ltbench report`: a static HTML report of a run directory or of a runs folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("path", required=False, default="runs", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.html",
              help="Where to write the page. [default: PATH/report.html]")
@click.option("--dataset", metavar="NAME", help="Runs folder: only this dataset.")
@click.option("--with-paper", is_flag=True, help="Runs folder: add the LTAD paper's published numbers.")
@click.option("--embed-images", is_flag=True,
              help="Run directory: embed the anomaly-map PNGs in the page (one portable file) instead of linking them.")
def report_command(path: Path, out: Path | None, dataset: str | None, with_paper: bool, embed_images: bool) -> None:
    """Write a static HTML report (no server, no JavaScript) of a run directory or a runs folder (PATH)."""
    from ltbench.errors import RunError
    from ltbench.report import is_run_dir, write_run_report, write_runs_report

    if is_run_dir(path):
        if dataset is not None or with_paper:
            raise click.UsageError("--dataset and --with-paper apply to a runs folder, not to one run directory")
        written = write_run_report(path, out, embed_images=embed_images)
    elif path.is_dir():
        if embed_images:
            raise click.UsageError("--embed-images applies to one run directory; a runs folder's page links to them")
        written, linked = write_runs_report(path, out, dataset=dataset, with_paper=with_paper)
        click.echo(f"Linked {len(linked)} run reports.", err=True)
    else:
        raise RunError(f"{path} does not exist: give a run directory or a runs folder made by ltbench run")
    click.echo(f"Wrote {written}")


COMMANDS = [report_command]
