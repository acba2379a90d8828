"""`tapml run`: generate text with a model."""

from __future__ import annotations

import sys

import click

from .options import compile_options


@click.command("run")
@click.argument("model")
@click.option("--prompt", "-p", required=True, help="The text to complete.")
@click.option(
    "--max-tokens", "-n", type=click.IntRange(1), default=64, show_default=True,
    help="Most tokens to generate.",
)  # fmt: skip
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@compile_options
@click.pass_obj
def command(
    obj, model, prompt, max_tokens, chat, target, quantization, max_context, chunk,
    target_options,
) -> None:  # fmt: skip
    """Complete PROMPT with MODEL, streaming the text to stdout (greedy decoding).

    MODEL is a name from `tapml models`, a .gguf path, or a directory written by
    `tapml compile`. Names and GGUF files are compiled on first use and cached.
    Speeds go to stderr, so stdout holds only the completion.

    \b
    Example:
      tapml run smollm2-135m --prompt "The capital of France is" --max-tokens 16
    """
    from pathlib import Path

    from tapml.api import ensure_compiled
    from tapml.compiler import CONFIG_FILE
    from tapml.runtime.engine import Engine

    if (Path(model) / CONFIG_FILE).is_file():
        artifact = Path(model)
    else:
        artifact = ensure_compiled(
            model, target, quantization, max_context, chunk, target_options, obj["progress"]
        )
    engine = Engine(artifact)
    for piece in engine.generate(prompt, max_tokens=max_tokens, chat=chat):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = engine.stats
    click.echo(
        f"prefill: {s.prompt_tokens} tokens, {s.prefill_tok_s:.1f} tok/s; "
        f"decode: {s.decode_tokens} tokens, {s.decode_tok_s:.1f} tok/s",
        err=True,
    )
