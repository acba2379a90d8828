"""`tapml cache`: the compiled artifacts `tapml run` keeps."""

from __future__ import annotations

import click


@click.group("cache")
def command() -> None:
    """Inspect or clear the compile cache ($TAPML_CACHE_DIR or ~/.cache/tapml)."""


@command.command("list")
def list_entries() -> None:
    """Each cached artifact with its size."""
    from tapml.cache import cache_root, entries

    found = entries()
    for path, size in found:
        click.echo(f"{size / 2**20:9.1f} MiB  {path}")
    click.echo(f"{len(found)} cached builds in {cache_root()}", err=True)


@command.command("clear")
def clear() -> None:
    """Delete every cached artifact, and the converted weights they share."""
    from tapml.cache import cache_root, clear

    click.echo(f"removed {clear()} cached builds from {cache_root()}", err=True)
