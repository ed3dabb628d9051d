"""The `ltbench` command line: a thin click shell over the library.

Every `LTBenchError` becomes one line `Error: ...` on stderr and exit code 1; bad usage is
click's exit code 2. Commands live in `ltbench/commands/<topic>.py`, each exporting `COMMANDS`.
"""

from __future__ import annotations

import importlib
import sys

import click

from ltbench import __version__
from ltbench.errors import LTBenchError

COMMAND_MODULES = ("splits", "run", "report", "cache", "hf", "ltad")


class LTBenchGroup(click.Group):
    """A click group that reports library errors as one line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LTBenchError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


@click.group(cls=LTBenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ltbench")
def main() -> None:
    """LTBench: long-tailed, multi-class, unsupervised industrial anomaly detection."""


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"ltbench.commands.{_name}")
    except ModuleNotFoundError as _exc:  # a topic not written yet must not break the others
        if _exc.name != f"ltbench.commands.{_name}":
            raise
        continue
    for _command in _module.COMMANDS:
        main.add_command(_command)


def echo(message: str = "") -> None:
    """Print a line to stdout (the one place commands print results)."""
    click.echo(message)


if __name__ == "__main__":
    main()
