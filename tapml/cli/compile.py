"""`tapml compile`: a model for one target, into an artifact directory."""

from __future__ import annotations

from pathlib import Path

import click

from tapml.compiler import CompileOptions, compile_model

from .options import buckets_option, compile_options, input_shape_option


@click.command("compile")
@click.argument("model")
@compile_options
@buckets_option
@input_shape_option
@click.option(
    "-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="Directory to write plan, kernels, weights and tokenizer into.",
)  # fmt: skip
@click.pass_obj
def command(obj, model, target, quantization, max_context, chunk, target_options, kv_cache,
            buckets, input_shapes, output) -> None:  # fmt: skip
    """Compile MODEL (a name from `tapml models`, a .gguf file, a Hugging Face checkpoint's
    directory with model.safetensors, of an architecture tapml has, or an .onnx graph at fixed
    input shapes) for a target.

    \b
    Examples:
      tapml compile smollm2-135m --target llvm --quantization q4f32_1 -o dist/smollm2
      tapml compile all-minilm-l6-v2 --target webgpu --buckets 1x128,8x128 -o dist/minilm
      tapml compile model.onnx --input-shape x=1,3,640,640 --target webgpu -o dist/det
    """
    from tapml.models import default_input_shapes, resolve_gguf

    _, gguf_path = resolve_gguf(model)
    options = CompileOptions.resolve(target, quantization, max_context, chunk, target_options,
                                     kv_cache, buckets=buckets, source=gguf_path,
                                     input_shapes=input_shapes or default_input_shapes(model)
                                     )  # fmt: skip
    out = compile_model(gguf_path, output, options, progress=obj["progress"])
    click.echo(str(out))
