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


def add_commands(group: click.Group, modules: tuple[str, ...]) -> None:
    """Add the `COMMANDS` of each `ltbench.commands.<module>` to `group`.

    A missing or misspelt module raises ModuleNotFoundError: a command never silently disappears.
    """
    for name in modules:
        for command in importlib.import_module(f"ltbench.commands.{name}").COMMANDS:
            group.add_command(command)


add_commands(main, COMMAND_MODULES)


if __name__ == "__main__":
    main()
