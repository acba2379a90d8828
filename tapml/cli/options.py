"""Options shared by the commands that compile a model."""

from __future__ import annotations

import json
from dataclasses import fields

import click
from click.core import ParameterSource

from tapml.compiler import (
    DEFAULT_BUCKETS,
    DEFAULT_CHUNK,
    DEFAULT_MAX_CONTEXT,
    KV_CACHE_DTYPES,
    CompileOptions,
    parse_buckets,
)
from tapml.errors import TapmlError
from tapml.graph import parse_input_shapes
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


quantization_option = click.option(
    "--quantization", type=click.Choice(list(QUANTIZATION)), default=None,
    help="How weights are kept [default: gguf for a GGUF, q0f32 for a float checkpoint or an "
    "ONNX graph]. "
    "gguf: each matrix in the blocks its GGUF "
    "stores (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K; F16), read losslessly; q4f32_1, "
    "q4f16_1: re-quantized to tapml's 4-bit groups; q0f32, q0f16: floats. The artifact's "
    "tapml-config.json lists each matrix's format.",
)  # fmt: skip


def compile_options(f):
    """--target, --quantization, --max-context, --chunk, --target-option, --kv-cache."""
    for decorator in reversed(
        [
            click.option(
                "--target", type=click.Choice(list(TARGETS)), default="llvm", show_default=True,
                help="Where the kernels run.",
            ),
            quantization_option,
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
                help="TVM target option, e.g. mcpu=znver4 (default: this machine's CPU); and "
                "prefill=auto|float32|int8 and decode=auto|float32|int8 on llvm: that stage's "
                "matmuls over quantized weights (decode's: those of one row) with int8 "
                "activations as llama.cpp's "
                "(prefill 2-3x faster, decode 1.3x; logits about 1% off "
                "float32's; needs AVX-512 VNNI) or float32 [default: auto, int8 for a causal LM "
                "where the CPU has VNNI].",
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


def _parse_buckets(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return parse_buckets(value)
    except TapmlError as e:
        raise click.BadParameter(str(e), ctx, param) from e


buckets_option = click.option(
    "--buckets", callback=_parse_buckets, metavar="BxS,...",
    help="An embedding model's compiled (batch, length) shapes [default: "
    + ",".join(f"{b}x{s}" for b, s in DEFAULT_BUCKETS) + "]. Texts are padded to the "
    "shortest length that holds them; a text longer than the longest is cut to it (with a "
    "warning).",
)  # fmt: skip


def _parse_input_shapes(ctx, param, value: tuple[str, ...]):
    try:
        return parse_input_shapes(value)
    except TapmlError as e:
        raise click.BadParameter(str(e), ctx, param) from e


input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
    callback=_parse_input_shapes,
    help="An ONNX graph's input shape, fixed at compile time (repeatable; a name given N times "
    "makes N entry points, e.g. x=1,3,48,320 and x=1,3,48,640) [default: the model card's "
    "shapes, else the graph's own static ones].",
)  # fmt: skip


def refuse_artifact_conflicts(model: str | None, **renamed: str) -> None:
    """A UsageError naming every compile option given on the command line that differs from the
    one MODEL was compiled with, when MODEL is a compiled directory: it runs as compiled, so
    the option would be ignored. `renamed`: parameter name -> the compile option it gives, for
    one named otherwise (carve's --source is the target)."""
    from tapml.artifact import Artifact

    if model is None or not Artifact.is_artifact(model):
        return
    ctx = click.get_current_context()
    compiled = Artifact(model).options
    names = {f.name for f in fields(CompileOptions)}
    conflicts = []
    for param in ctx.command.params:
        key = renamed.get(param.name, param.name)
        if key not in names or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        flag, given, has = param.opts[0], ctx.params[param.name], compiled[key]
        if key == "target_options":
            conflicts += [f"{flag} {k}={has.get(k)}, not {k}={v}"
                          for k, v in given.items() if has.get(k) != v]  # fmt: skip
        elif json.loads(json.dumps(given)) != has:  # buckets: tuples given, lists compiled
            conflicts.append(f"{flag} {has}, not {given}")
    if conflicts:
        raise click.UsageError(
            f"{model} was compiled with {'; '.join(conflicts)}: a compiled directory runs as "
            "compiled, so drop the option, or pass the model's name or GGUF file to compile it "
            "with yours"
        )


def threads_option(f):
    """--threads: CPU threads for the llvm target's kernels."""
    return click.option(
        "--threads", type=click.IntRange(1), default=None,
        help="CPU threads for llvm kernels [default: one per physical core].",
    )(f)  # fmt: skip
