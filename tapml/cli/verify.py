"""`tapml verify`: check a bundle's files against its manifest."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("verify")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_obj
def command(obj, bundle) -> None:
    """Check every file of BUNDLE (written by `tapml package`) against the size and sha256
    in its bundle.json. Each missing, truncated or corrupted file is named; the exit code is
    1 when any is.
    """
    from tapml.package import read_manifest, verify

    problems = verify(bundle, progress=obj["progress"])
    for problem in problems:
        click.echo(f"{bundle}: {problem}", err=True)
    if problems:
        raise click.ClickException(
            f"{bundle} is damaged ({len(problems)} of its files); package the model again"
        )
    manifest = read_manifest(bundle)
    total = sum(f["nbytes"] for f in manifest["files"])
    click.echo(f"{bundle}: {len(manifest['files'])} files, {total / 2**20:.1f} MiB, all intact")
