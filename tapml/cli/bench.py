"""`tapml bench`: prefill and decode speed of a model."""

from __future__ import annotations

import json

import click

from .options import compile_options


@click.command("bench")
@click.argument("model")
@compile_options
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for the llvm target [default: all cores].")  # fmt: skip
@click.option("--prompt-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def command(
    obj, model, target, quantization, max_context, chunk, target_options, threads,
    prompt_tokens, decode_tokens, as_json,
) -> None:  # fmt: skip
    """Measure prefill tokens/s for a PROMPT_TOKENS prompt and decode tokens/s.

    \b
    Example:
      tapml bench smollm2-135m --target llvm --threads 2 --json
    """
    import os
    from pathlib import Path

    if threads:  # read by the TVM runtime when its thread pool starts
        os.environ["TVM_NUM_THREADS"] = str(threads)
    from tapml import bench
    from tapml.api import ensure_compiled
    from tapml.compiler import CONFIG_FILE
    from tapml.runtime.engine import Engine

    if (Path(model) / CONFIG_FILE).is_file():
        artifact = Path(model)
    else:
        artifact = ensure_compiled(
            model, target, quantization, max_context, chunk, target_options, obj["progress"]
        )
    result = bench.run(Engine(artifact), prompt_tokens, decode_tokens)
    result["threads"] = threads or os.cpu_count()
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"prefill {result['prefill_tok_s']:8.1f} tok/s ({prompt_tokens} tokens)\n"
            f"decode  {result['decode_tok_s']:8.1f} tok/s ({decode_tokens} tokens)\n"
            f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['threads']} threads"
        )
