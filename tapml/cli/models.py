"""`tapml models`: the model zoo and where each model's weights come from."""

from __future__ import annotations

import json

import click

from tapml.models import ARCHITECTURES, MODELS


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model.")
def command(as_json: bool) -> None:
    """List the models tapml knows by name and whether their weights are installed, then the
    architectures it has.

    A .gguf file of any of these architectures also works wherever a model name does.
    """
    rows = []
    for card in MODELS.values():
        installed = card.installed()
        # Files are checked and parts joined on first use (gguf_path), not by listing: show
        # where they are or will be.
        path = (card.joined_path or card.parts[0].file()) if installed else None
        rows.append({
            "name": card.name, "architecture": card.architecture,
            "description": card.description, "packages": [p.package for p in card.parts],
            "installed": installed, "path": str(path) if path else None,
            "install": card.install_command,
        })  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        state = "installed" if r["installed"] else f"not installed: {r['install']}"
        first, *rest = r["packages"]
        weights = f"{first} .. {rest[-1]}, {len(rest) + 1} parts" if rest else first
        click.echo(f"{r['name']:20} {r['architecture']:8} {r['description']}")
        click.echo(f"{'':20} weights: {weights} ({state})")
    click.echo("\narchitectures (a .gguf of one, or a checkpoint's directory, is a model too):")
    for arch in ARCHITECTURES.values():
        click.echo(f"  {arch.name:14} {arch.description}")
