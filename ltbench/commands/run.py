"""`ltbench run`, `ltbench leaderboard` and `ltbench predict`: parse, call the library, print.

The library modules are imported inside the commands so that `ltbench --help` stays fast.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click


def _command_line(ctx: click.Context) -> str:
    """The command as the user typed it, rebuilt from the parameters given on the command line."""
    from click.core import ParameterSource

    parts = ["ltbench", *ctx.command_path.split()[1:]]  # the program name as installed
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            parts += [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
        elif getattr(param, "is_flag", False):
            parts.append(param.opts[0])
        else:
            for item in value if isinstance(value, tuple) else (value,):
                parts += [param.opts[0], str(item)]
    return " ".join(shlex.quote(part) if i else part for i, part in enumerate(parts))


def _info(line: str) -> None:
    """Progress and notes go to stderr, results to stdout."""
    click.echo(line, err=True)


@click.command("run")
@click.option("--model", "model", required=True, metavar="NAME",
              help="Registered detector name (ltad, uniad, ...) or package.module:ClassName.")
@click.option("--split", metavar="DATASET/CONFIG",
              help="Split to train and evaluate on, or a manifest CSV/JSON path. [default: synth/exp100]")
@click.option("--root", metavar="DIR", help="Dataset root. [default: $LTBENCH_DATA/<dataset>; synth: generated]")
@click.option("--preset", metavar="NAME", help="A preset of the detector. [default: quick on synth/*, else paper]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.json",
              help="JSON object of config fields (applied over the preset).")
@click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
              help="Override one config field (repeatable; applied last).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              metavar="DIR", help="Runs folder: the run goes to DIR/<model>/<dataset>-<config>/<timestamp>/.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available, else cpu]")
@click.option("--seed", type=int, help="Seed of every random generator. [default: 0]")
@click.option("--resume", type=click.Path(path_type=Path), metavar="RUN_DIR",
              help="Continue an interrupted run (its .partial folder, or the run directory it will become).")
@click.option("--backbone", metavar="NAME",
              help="Frozen backbone (align, lite, tiny-align, efficientnet-b7, resnet18, wide_resnet50_2, vgg16; "
                   "NAME:/path for local weights); shorthand for --set backbone=NAME.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Test images per predict call.")
@click.option("--overlays", "overlays_per_class", type=click.IntRange(min=0), default=3, show_default=True,
              help="Anomaly-map overlays written per class.")
@click.option("--report/--no-report", "write_report", default=True, show_default=True,
              help="Write report.html (tables, charts, anomaly maps) into the run directory.")
def run_command(model: str, split: str | None, root: str | None, preset: str | None, config_file: Path | None,
                set_values: tuple[str, ...], out: Path, device: str | None, seed: int | None, resume: Path | None,
                backbone: str | None, batch_size: int, overlays_per_class: int, write_report: bool) -> None:
    """Train a detector on a long-tailed split, evaluate it and write a run directory."""
    from ltbench.runner import RunOptions, run

    if backbone is not None:  # applied first, so an explicit --set backbone=... still wins
        set_values = (f"backbone={backbone}", *set_values)

    options = RunOptions(model=model, split=split, root=root, preset=preset, config_file=config_file,
                         set_values=set_values, out=out, device=device, seed=seed, resume=resume,
                         batch_size=batch_size, overlays_per_class=overlays_per_class, report=write_report,
                         command=_command_line(click.get_current_context()))
    result = run(options, report=_info)
    if result.evaluation is None:  # another rank of a distributed run: rank 0 prints
        return
    click.echo(result.evaluation.format_summary())
    click.echo(f"Run directory: {result.run_dir}")


@click.command("leaderboard")
@click.argument("runs_dir", required=False, default="runs", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset", metavar="NAME", help="Only this dataset (mvtec, visa, dagm, synth, ...).")
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True)
@click.option("--per-class", is_flag=True, help="Per-class tables (All, High, Low, then each class).")
@click.option("--with-paper", is_flag=True, help="Add the LTAD paper's published numbers, marked (reported).")
def leaderboard_command(runs_dir: Path, dataset: str | None, fmt: str, per_class: bool, with_paper: bool) -> None:
    """Tables of finished runs in the layout of the LTAD paper (image and pixel AUROC, %)."""
    from ltbench.leaderboard import build_leaderboard, render

    board = build_leaderboard(runs_dir, dataset=dataset, per_class=per_class, with_paper=with_paper)
    for note in board.notes:
        _info(f"Note: {note}")
    click.echo(render(board, fmt), nl=False)


@click.command("predict")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--class", "class_name", required=True, metavar="NAME", help="The class of the images.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("predictions"),
              show_default=True, metavar="DIR", help="Folder for scores.csv and the overlay PNGs.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available, else cpu]")
def predict_command(run_dir: Path, images: tuple[Path, ...], class_name: str, out: Path, device: str | None) -> None:
    """Score new images with a finished run's model and write heat-map overlays."""
    from ltbench.predict import predict_images
    from ltbench.rundir import SCORES_FILE

    results = predict_images(run_dir, list(images), class_name, out, device=device)
    width = max(len(f"{r.score:.6g}") for r in results)
    click.echo(f"{'score'.rjust(width)}  image")
    for result in results:
        click.echo(f"{result.score:{width}.6g}  {result.image}")
    _info(f"Wrote {out / SCORES_FILE} and {len(results)} overlays in {out}")


COMMANDS = [run_command, leaderboard_command, predict_command]
