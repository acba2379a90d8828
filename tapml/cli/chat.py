"""`tapml chat`: an interactive multi-turn conversation with a model."""

from __future__ import annotations

import sys

import click

from .options import compile_options, refuse_artifact_conflicts, threads_option
from .run import context_notice, load_engine, sampling_options, sampling_params


@click.command("chat")
@click.argument("model")
@click.option("--system", metavar="TEXT", help="System message that opens the conversation.")
@click.option(
    "--max-tokens", "-n", type=click.IntRange(1), default=256, show_default=True,
    help="Most tokens per reply.",
)  # fmt: skip
@sampling_options
@compile_options
@threads_option
@click.pass_obj
def command(
    obj, model, system, max_tokens, target, quantization, max_context, chunk, target_options,
    kv_cache, threads, **options,
) -> None:  # fmt: skip
    """Chat with MODEL: type a message after "> ", the reply streams to stdout.

    Every turn sends the whole conversation through the model's chat template; what the
    model has read already stays in its KV cache, so only the new turn is read. When it
    would no longer fit the compiled context with room for the reply, the oldest turns are
    dropped (a notice goes to stderr). Ctrl-D or Ctrl-C ends the session.

    \b
    Example:
      tapml chat smollm2-135m --system "Answer in one sentence." -t 0.7 --seed 1
    """
    refuse_artifact_conflicts(model)
    params = sampling_params(options, max_tokens)
    engine = load_engine(
        obj, model, target, quantization, max_context, chunk, target_options, kv_cache, threads
    )
    try:
        _converse(engine, params, system)
    except (EOFError, KeyboardInterrupt):
        click.echo(err=True)


def _converse(engine, params, system: str | None) -> None:
    """Read a message, reply, repeat, until input ends (EOFError) or KeyboardInterrupt."""
    opening = [{"role": "system", "content": system}] if system is not None else []
    # room kept for the reply: --max-tokens, but at most half the context so that a large
    # --max-tokens still leaves room for the conversation (the reply then ends at the context)
    room = min(params.max_tokens, engine.max_context // 2)
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() then edits lines and keeps a history)
        except ImportError:  # Windows
            pass
    while True:
        if interactive:
            # readline redraws the prompt it was given; in a terminal stdout is the screen
            message = input("> ")
        else:
            click.echo("> ", nl=False, err=True)  # stdout holds the replies only
            message = input()
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        ids = _fit(engine, opening, history, room)
        if ids is None:
            history.pop()
            continue
        reply = []
        # the conversation so far is in the KV cache: only the new turn is prefilled
        for piece in engine.generate_text(ids, params, reuse_prefix=True):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        context_notice(engine)
        history.append({"role": "assistant", "content": "".join(reply)})


def _fit(engine, opening, history, room: int) -> list[int] | None:
    """The prompt ids of the conversation, after dropping the oldest turns it takes to leave
    `room` tokens of the context for the reply; None (and a message) if the last message
    alone does not fit. Drops from `history` in place."""
    tokenizer, limit = engine.tokenizer, engine.max_context
    dropped = 0
    while True:
        ids = tokenizer.encode(tokenizer.apply_chat_template(opening + history))
        if len(ids) + room <= limit:
            break
        if len(history) == 1:
            click.echo(
                f"tapml: your message needs {len(ids)} tokens with the chat template; with "
                f"{room} for the reply that exceeds the context of {limit} tokens: shorten it "
                "(or compile with a larger --max-context)",
                err=True,
            )
            return None
        # a turn is the user's message and the reply to it
        del history[:2]
        dropped += 1
    if dropped:
        turns = "turn" if dropped == 1 else "turns"
        click.echo(
            f"tapml: dropped the oldest {dropped} {turns} of the conversation to fit the "
            f"context of {limit} tokens",
            err=True,
        )
    return ids
