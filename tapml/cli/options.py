"""Options shared by the commands that compile a model."""

from __future__ import annotations

import click

from tapml.compiler import DEFAULT_CHUNK, DEFAULT_MAX_CONTEXT, KV_CACHE_DTYPES
from tapml.quantization import QUANTIZATION
from tapml.targets import TARGETS


def _parse_target_options(ctx, param, values: tuple[str, ...]) -> dict[str, str | int]:
    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        options[key] = int(value) if value.isdigit() else value
    return options


def compile_options(f):
    """--target, --quantization, --max-context, --chunk, --target-option, --kv-cache."""
    for decorator in reversed(
        [
            click.option(
                "--target", type=click.Choice(list(TARGETS)), default="llvm", show_default=True,
                help="Where the kernels run.",
            ),
            click.option(
                "--quantization", type=click.Choice(list(QUANTIZATION)), default=None,
                help="Weight format [default: q4f32_1, or q4f16_1 on targets with native f16].",
            ),
            click.option(
                "--max-context", type=click.IntRange(1), default=DEFAULT_MAX_CONTEXT,
                show_default=True, help="Tokens the KV cache holds (prompt + completion).",
            ),
            click.option(
                "--chunk", type=click.IntRange(1), default=DEFAULT_CHUNK, show_default=True,
                help="Tokens per prefill step (the last chunk of a prompt is padded).",
            ),
            click.option(
                "--target-option", "target_options", multiple=True, metavar="KEY=VALUE",
                callback=_parse_target_options,
                help="TVM target option, e.g. mcpu=znver4 (default: this machine's CPU).",
            ),
            click.option(
                "--kv-cache", type=click.Choice(KV_CACHE_DTYPES), default=None,
                help="dtype of the KV cache [default: float16 on llvm, where it halves what "
                "attention reads; else the activations' dtype].",
            ),
        ]
    ):  # fmt: skip
        f = decorator(f)
    return f


def threads_option(f):
    """--threads: CPU threads for the llvm target's kernels."""
    return click.option(
        "--threads", type=click.IntRange(1), default=None,
        help="CPU threads for llvm kernels [default: one per physical core].",
    )(f)  # fmt: skip
