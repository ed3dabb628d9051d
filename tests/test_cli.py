"""The `ltbench` command group: every command module is registered, and a misspelt one is an error."""

from __future__ import annotations

import click
import pytest

from ltbench.cli import COMMAND_MODULES, add_commands, main


def test_every_command_is_registered() -> None:
    assert set(main.commands) == {"make-split", "list-splits", "show-split", "verify", "run", "leaderboard",
                                  "predict", "report", "cache", "download", "export-hf", "inspect-names"}
    assert COMMAND_MODULES == ("splits", "run", "report", "cache", "hf", "ltad")


def test_a_misspelt_command_module_is_an_error_not_a_missing_command() -> None:
    group = click.Group()
    with pytest.raises(ModuleNotFoundError, match="ltbench.commands.spilts"):
        add_commands(group, ("run", "spilts"))
