"""Command `ltbench inspect-names`: what a trained LTAD has learned to call each class.

A thin shell over `ltad_model.detector.inspect_names`: parse, call, print.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("inspect-names")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Vocabulary tokens to show for each token of a pseudo class name.")
def inspect_names_command(run_dir: Path, top: int) -> None:
    """For each class, the vocabulary tokens nearest (cosine) to each token of its learned name s_c.

    RUN_DIR is a run directory of `ltbench run --model ltad` (or ltad_wo_sad), or its model/ folder.
    """
    from ltad_model.detector import inspect_names

    meta, neighbours = inspect_names(run_dir, top)
    click.echo(f"Learned pseudo class names (backbone {meta.backbone}); nearest vocabulary tokens, cosine:")
    for class_name, tokens in neighbours.items():
        click.echo(class_name)
        for position, nearest in enumerate(tokens, start=1):
            listed = ", ".join(f"{token} {cosine:.3f}" for token, cosine in nearest)
            click.echo(f"  s_c[{position}]: {listed}")


COMMANDS = [inspect_names_command]
