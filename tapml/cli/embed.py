"""`tapml embed`: sentence embeddings of texts with an embedding model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tapml.targets import TARGETS

from .options import buckets_option, quantization_option, refuse_artifact_conflicts, threads_option


@click.command("embed")
@click.argument("model")
@click.argument("texts", nargs=-1)
@click.option(
    "--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also embed each non-empty line of this file (repeatable).",
)
@click.option(
    "--target", type=click.Choice(list(TARGETS)), default="llvm", show_default=True,
    help="Where the kernels run.",
)
@quantization_option
@buckets_option
@threads_option
@click.option("--json", "as_json", is_flag=True,
              help='Print {"model": ..., "embeddings": [[...], ...]} instead of one line each.')
@click.pass_obj
def command(obj, model, texts, files, target, quantization, buckets, threads, as_json) -> None:
    """Print the sentence embedding of each TEXT (and of each line of --file): one unit-length
    vector per text, in the order given, as a line of numbers.

    MODEL is an embedding model: a name from `tapml models` (all-minilm-l6-v2), a Hugging
    Face checkpoint's directory, or a compiled artifact. Texts are padded to the compiled
    bucket that holds them; a text longer than the longest bucket (256 tokens by default) is
    cut to it, with a warning on stderr. Similar texts have a large dot product.

    \b
    Examples:
      tapml embed all-minilm-l6-v2 "A cat sleeps on the sofa." "A kitten naps on the couch."
      tapml embed all-minilm-l6-v2 --file sentences.txt --target webgpu --json
    """
    from tapml.api import artifact_for
    from tapml.runtime.embedder import Embedder
    from tapml.targets.llvm import use_threads

    refuse_artifact_conflicts(model)
    texts = list(texts)
    for path in files:
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise click.UsageError("give at least one TEXT or a --file with lines of text")
    use_threads(threads)  # before TVM's thread pool starts
    artifact = artifact_for(model, target, quantization, progress=obj["progress"],
                            buckets=buckets)  # fmt: skip
    vectors = Embedder(artifact).embed(texts)
    if as_json:
        click.echo(json.dumps({"model": model, "embeddings": vectors.tolist()}))
        return
    for vector in vectors:
        click.echo(" ".join(f"{v:.6f}" for v in vector))
