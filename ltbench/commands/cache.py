"""Commands `ltbench cache info` and `ltbench cache clear`: the on-disk feature cache.

Thin shells over `ltbench.feature_cache.FeatureCache`, which imports torch; it is imported inside
the commands so that `ltbench --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

ROOT_OPTION = click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
                           help="Cache folder [default: $LTBENCH_HOME/features, LTBENCH_HOME=~/.cache/ltbench].")


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


@click.group("cache")
def cache_group() -> None:
    """The feature cache: frozen-encoder features stored per image, reused across epochs and runs."""


@cache_group.command("info")
@ROOT_OPTION
def info_command(root: Path | None) -> None:
    """Show entries and disk use per backbone."""
    from ltbench.feature_cache import FeatureCache

    info = FeatureCache(root).info()
    click.echo(f"Feature cache: {info['root']}")
    if not info["backbones"]:
        click.echo("empty")
        return
    width = max(len(folder) for folder in info["backbones"])
    click.echo(f"{'backbone':<{width}}  {'entries':>8}  {'size':>10}")
    for folder, entry in info["backbones"].items():
        click.echo(f"{folder:<{width}}  {entry['entries']:>8}  {_size(entry['bytes']):>10}")
    click.echo(f"{'total':<{width}}  {info['entries']:>8}  {_size(info['bytes']):>10}")


@cache_group.command("clear")
@ROOT_OPTION
@click.option("--backbone", default=None, help="Only this backbone's features (a name such as lite, or a folder).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def clear_command(root: Path | None, backbone: str | None, yes: bool) -> None:
    """Delete cached features (they are recomputed when next needed)."""
    from ltbench.feature_cache import FeatureCache

    cache = FeatureCache(root)
    what = f"the {backbone} features" if backbone else "all cached features"
    if not yes:
        click.confirm(f"Delete {what} in {cache.root}?", abort=True)
    removed = cache.clear(backbone)
    click.echo(f"Deleted {removed} cached feature files from {cache.root}.")


COMMANDS = [cache_group]
