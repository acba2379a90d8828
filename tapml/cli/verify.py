"""`tapml verify`: check a bundle's or a compiled artifact's files against their checksums."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_obj
def command(obj, directory) -> None:
    """Check every file of DIRECTORY: a bundle (written by `tapml package`) against the size and
    sha256 in its bundle.json, or a compiled model (written by `tapml compile`) against its
    checksums.json and its weight shards against weights/index.json. Every file is read in
    full. Each missing, truncated or corrupted file is named; the exit code is 1 when any is.
    """
    from tapml.artifact import CONFIG_FILE, Artifact
    from tapml.package import MANIFEST, read_manifest, verify

    if (directory / MANIFEST).is_file():
        problems, fix = verify(directory, progress=obj["progress"]), "package the model again"
        files = read_manifest(directory)["files"]
    elif Artifact.is_artifact(directory):
        artifact = Artifact(directory)
        problems, fix = artifact.damaged(progress=obj["progress"]), "compile the model again"
        files = [] if problems else artifact.checksums() + artifact.shard_checksums()
    else:
        raise click.ClickException(f"{directory} is neither a tapml bundle (it has no {MANIFEST}) "
                                   f"nor a compiled model (no {CONFIG_FILE})")  # fmt: skip
    for problem in problems:
        click.echo(f"{directory}: {problem}", err=True)
    if problems:
        raise click.ClickException(f"{directory} is damaged ({len(problems)} of its files); {fix}")
    total = sum(f["nbytes"] for f in files)
    click.echo(f"{directory}: {len(files)} files, {total / 2**20:.1f} MiB, all intact")
