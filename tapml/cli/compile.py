"""`tapml compile`: a model for one target, into an artifact directory."""

from __future__ import annotations

from pathlib import Path

import click

from tapml.compiler import CompileOptions, compile_model

from .options import buckets_option, compile_options


@click.command("compile")
@click.argument("model")
@compile_options
@buckets_option
@click.option(
    "-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="Directory to write plan, kernels, weights and tokenizer into.",
)  # fmt: skip
@click.pass_obj
def command(obj, model, target, quantization, max_context, chunk, target_options, kv_cache,
            buckets, output) -> None:  # fmt: skip
    """Compile MODEL (a name from `tapml models`, a .gguf file, or a Hugging Face checkpoint's
    directory with model.safetensors, of an architecture tapml has) for a target.

    \b
    Examples:
      tapml compile smollm2-135m --target llvm --quantization q4f32_1 -o dist/smollm2
      tapml compile all-minilm-l6-v2 --target webgpu --buckets 1x128,8x128 -o dist/minilm
    """
    from tapml.models import resolve_gguf

    _, gguf_path = resolve_gguf(model)
    options = CompileOptions.resolve(target, quantization, max_context, chunk, target_options,
                                     kv_cache, buckets=buckets, source=gguf_path)  # fmt: skip
    out = compile_model(gguf_path, output, options, progress=obj["progress"])
    click.echo(str(out))
