"""`tapml run`: generate text with a model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tapml.runtime.schema import MAX_ARRAY_ITEMS, MAX_NUMBER_DIGITS, MAX_STRING_LENGTH, Defaults
from tapml.startup import mark

from .options import compile_options, refuse_artifact_conflicts, threads_option

# the keyword arguments `sampling_options` adds, which `sampling_params` takes back out
SAMPLING_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "stop",
)  # fmt: skip
GRAMMAR_KEYS = ("json_schema", "any_json", "regex", "grammar", "grammar_backend",
                "strict_schema", "max_string_length", "max_number_digits", "max_array_items",
                "extra_properties")
INCOMPLETE = {
    "length": "--max-tokens ran out before the grammar completed",
    "context": "the compiled context ran out before the grammar completed "
    "(compile with a larger --max-context)",
}


def sampling_options(f):
    """--temperature, --top-k, --top-p, --min-p, the penalties, --seed, --stop (greedy default)."""
    for decorator in reversed(
        [
            click.option(
                "--temperature", "-t", type=click.FloatRange(0), default=0.0, show_default=True,
                help="Sampling temperature; 0 is greedy decoding.",
            ),
            click.option(
                "--top-k", type=click.IntRange(0), default=0, show_default=True,
                help="Sample among the K most likely tokens only (0: all).",
            ),
            click.option(
                "--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
                show_default=True,
                help="Sample among the fewest most likely tokens holding P of the probability.",
            ),
            click.option(
                "--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                help="Drop tokens less than P times as likely as the most likely one.",
            ),
            click.option(
                "--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0,
                show_default=True,
                help="Divide the logits of tokens already seen (prompt included); 1 is off.",
            ),
            click.option(
                "--presence-penalty", type=click.FloatRange(-2, 2), default=0.0,
                show_default=True, help="Subtract from the logits of tokens generated already.",
            ),
            click.option(
                "--frequency-penalty", type=click.FloatRange(-2, 2), default=0.0,
                show_default=True,
                help="Subtract, times their count, from the logits of tokens generated already.",
            ),
            click.option(
                "--seed", type=click.IntRange(0), default=None,
                help="Seed of the sampler: the same seed gives the same text [default: random].",
            ),
            click.option(
                "--stop", multiple=True, metavar="TEXT",
                help="End the output before this text (repeatable).",
            ),
        ]
    ):  # fmt: skip
        f = decorator(f)
    return f


def sampling_params(options: dict, max_tokens: int):
    """A SamplingParams from the options `sampling_options` added (taken out of `options`)."""
    from tapml.runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, **{k: options.pop(k) for k in SAMPLING_KEYS})


def load_engine(obj, model, target, quantization, max_context, chunk, target_options,
                kv_cache=None, threads=None):  # fmt: skip
    """An Engine for a compiled directory, or for a name or GGUF compiled on first use."""
    from tapml.targets.llvm import use_threads

    use_threads(threads)  # before TVM's thread pool starts
    from tapml.api import artifact_for
    from tapml.runtime.engine import Engine

    return Engine(
        artifact_for(
            model, target, quantization, max_context, chunk, target_options, obj["progress"],
            kv_cache,
        )
    )


def context_notice(engine) -> None:
    """Say on stderr when the last generation ended because the compiled context was full."""
    if engine.finish_reason == "context":
        click.echo(
            f"tapml: the output stops here: the context of {engine.max_context} tokens (prompt "
            "and output) is full; compile the model with a larger --max-context for more",
            err=True,
        )


def grammar_options(f):
    """--json-schema, --any-json, --regex, --grammar, --grammar-backend."""
    file = click.Path(exists=True, dir_okay=False, path_type=Path)
    for decorator in reversed(
        [
            click.option(
                "--json-schema", type=file, metavar="FILE",
                help="Constrain the output to JSON matching this JSON Schema.",
            ),
            click.option(
                "--any-json", is_flag=True, help="Constrain the output to a JSON object."
            ),
            click.option(
                "--regex", metavar="R", help="Constrain the output to match this regex in full."
            ),
            click.option(
                "--grammar", type=file, metavar="FILE",
                help="Constrain the output to this GBNF grammar (its start rule is named root).",
            ),
            click.option(
                "--grammar-backend", type=click.Choice(["llguidance", "xgrammar"]),
                help="What enforces the constraint [default: llguidance, then xgrammar for a "
                     "grammar llguidance cannot compile].",
            ),
            click.option(
                "--strict-schema", is_flag=True,
                help="Refuse a JSON schema with keywords the grammar cannot enforce (by "
                     "default the output is checked against them after generation).",
            ),
            _bound("--max-string-length", MAX_STRING_LENGTH,
                   "Longest string the model may write where the JSON schema allows longer "
                   "ones."),
            _bound("--max-number-digits", MAX_NUMBER_DIGITS,
                   "Most digits in a row: in each part (integral, fraction, exponent) of a JSON "
                   "number, and inside strings."),
            _bound("--max-array-items", MAX_ARRAY_ITEMS,
                   "Most items in a JSON array where the schema allows more, and most "
                   "properties an open object adds to those it names."),
            click.option(
                "--extra-properties", is_flag=True,
                help="Let the model add object properties the JSON schema allows but does not "
                     "name (by default it writes only those the schema names).",
            ),
        ]
    ):  # fmt: skip
        f = decorator(f)
    return f


def _bound(flag: str, default: int, help: str):
    """An option bounding what the model may write under a JSON schema; 0 lifts the bound."""
    return click.option(flag, type=click.IntRange(0), default=default, show_default=True,
                        help=f"{help} 0: no limit.")  # fmt: skip


def constraint_from_options(
    tokenizer, json_schema=None, any_json=False, regex=None, grammar=None,
    grammar_backend=None, strict_schema=False, max_string_length=MAX_STRING_LENGTH,
    max_number_digits=MAX_NUMBER_DIGITS, max_array_items=MAX_ARRAY_ITEMS, extra_properties=False,
):  # fmt: skip
    """The Constraint the grammar options ask for, or None when they ask for none.

    The grammar backends are tapml.runtime.grammar's; this only reads the options (and the
    files they name).
    """
    given = {"json_schema": json_schema, "any_json": any_json, "regex": regex, "grammar": grammar}
    chosen = {kind: value for kind, value in given.items() if value}
    if not chosen:
        return None
    if len(chosen) > 1:
        flags = ", ".join("--" + kind.replace("_", "-") for kind in chosen)
        raise click.UsageError(f"choose one constraint, not {flags}")
    ((kind, value),) = chosen.items()
    if kind in ("json_schema", "grammar"):
        value = value.read_text(encoding="utf-8")
    elif kind == "any_json":
        value = None
    from tapml.runtime.grammar import make_constraint

    defaults = Defaults(max_string_length, max_number_digits, extra_properties, max_array_items)
    return make_constraint(kind, value, tokenizer, grammar_backend, defaults=defaults,
                           strict=strict_schema)  # fmt: skip


def check_schema(constraint, output: str) -> None:
    """Exit 1 naming each keyword and path a finished JSON output breaks (the keywords the
    grammar left to this check)."""
    problems = constraint.violations(output) if constraint is not None else []
    if problems:
        raise click.ClickException(
            "the output does not match the JSON schema: " + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        )


@click.command("run")
@click.argument("model", required=False)
@click.option(
    "--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run a bundle written by `tapml package` (instead of MODEL), with its target's executor.",
)  # fmt: skip
@click.option("--prompt", "-p", required=True, help="The text to complete.")
@click.option(
    "--max-tokens", "-n", type=click.IntRange(1), default=64, show_default=True,
    help="Most tokens to generate.",
)  # fmt: skip
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", metavar="TEXT", help="System message before the prompt (with --chat).")
@sampling_options
@grammar_options
@compile_options
@threads_option
@click.pass_obj
def command(
    obj, model, bundle, prompt, max_tokens, chat, system, target, quantization, max_context,
    chunk, target_options, kv_cache, threads, **options,
) -> None:  # fmt: skip
    """Complete PROMPT with MODEL, streaming the text to stdout (greedy unless --temperature).

    MODEL is a name from `tapml models`, a .gguf path, or a directory written by
    `tapml compile`; or pass --bundle DIR to run a bundle from `tapml package`.
    Names and GGUF files are compiled on first use and cached.
    Speeds go to stderr, so stdout holds only the completion. With a constraint
    (--json-schema, --any-json, --regex, --grammar), an output cut short by --max-tokens
    is printed and the exit code is 1.

    \b
    Examples:
      tapml run smollm2-135m --prompt "The capital of France is" --max-tokens 16
      tapml run smollm2-135m --chat -p "Write a haiku." -t 0.8 --top-p 0.95 --seed 1
    """
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat (it is a message of the chat template)")
    if (model is None) == (bundle is None):
        raise click.UsageError("give either MODEL or --bundle DIR")
    if bundle is not None:
        from tapml.package import read_manifest

        read_manifest(bundle)  # a bundle is an artifact directory with a manifest
        model = str(bundle)
    refuse_artifact_conflicts(model)
    mark("imports")  # Python and the command line
    params = sampling_params(options, max_tokens)
    engine = load_engine(
        obj, model, target, quantization, max_context, chunk, target_options, kv_cache, threads
    )
    constraint = constraint_from_options(
        engine.tokenizer, **{k: options.pop(k) for k in GRAMMAR_KEYS}
    )
    pieces = []
    for piece in engine.generate(prompt, params, chat=chat, system=system, constraint=constraint):
        if not pieces:
            mark("first token")
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = engine.stats
    click.echo(
        f"prefill: {s.prompt_tokens} tokens, {s.prefill_tok_s:.1f} tok/s; "
        f"decode: {s.decode_tokens} tokens, {s.decode_tok_s:.1f} tok/s",
        err=True,
    )
    if constraint is not None and engine.finish_reason in INCOMPLETE:
        raise click.ClickException(f"output is incomplete: {INCOMPLETE[engine.finish_reason]}")
    context_notice(engine)
    check_schema(constraint, "".join(pieces))
