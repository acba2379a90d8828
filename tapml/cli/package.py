"""`tapml package`: a compiled model as a bundle a browser or a phone app loads."""

from __future__ import annotations

from pathlib import Path

import click

from tapml.compiler import DEFAULT_CHUNK, DEFAULT_MAX_CONTEXT
from tapml.package import PLATFORMS

from .options import buckets_option, quantization_option


@click.command("package")
@click.argument("model")
@click.option(
    "--target", type=click.Choice(list(PLATFORMS)), required=True,
    help="webgpu: a web page that runs the model offline (chat, or sentence similarity for an "
    "embedding model); android: OpenCL kernels for phones.",
)
@quantization_option
@click.option(
    "--max-context", type=click.IntRange(1), default=DEFAULT_MAX_CONTEXT, show_default=True,
    help="Tokens the KV cache holds (prompt + completion).",
)
@click.option(
    "--chunk", type=click.IntRange(1), default=DEFAULT_CHUNK, show_default=True,
    help="Tokens per prefill step (the last chunk of a prompt is padded).",
)
@buckets_option
@click.option(
    "-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="Bundle directory to write (an existing bundle there is replaced).",
)  # fmt: skip
@click.pass_obj
def command(obj, model, target, quantization, max_context, chunk, buckets, output) -> None:
    """Package MODEL (a name from `tapml models`, a .gguf, or a directory compiled for the
    target's kernels) with checksums and a manifest; compiles it first when needed.

    \b
    Examples:
      tapml package smollm2-135m --target webgpu -o dist/smollm2-web
      python -m http.server -d dist/smollm2-web 8000   # then open http://localhost:8000
      tapml package smollm2-135m --target android --quantization q4f16_1 -o dist/smollm2-android
      tapml package all-minilm-l6-v2 --target webgpu -o dist/minilm-web   # sentence similarity
    """
    from tapml.package import package

    done = package(model, target, output, quantization, max_context, chunk,
                   progress=obj["progress"], buckets=buckets)  # fmt: skip
    m = done.manifest
    click.echo(
        f"{done.path}: {m['platform']} bundle of {m['model']} ({m['quantization']}), "
        f"{len(m['files'])} files, {done.nbytes / 2**20:.1f} MiB",
        err=True,
    )
    click.echo(str(done.path))
