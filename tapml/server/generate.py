"""What the worker runs for a request: a generation or an embedding, reported as events.

A generation emits Text events as the text streams, then one Finish; an embedding emits its
vectors. An output that a JSON response format's check after generation refuses (a keyword
the grammar left to it, or JSON cut short by max_tokens) ends in ApiError 422, never in a
finish with invalid JSON.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ApiError
from .requests import Embedding, Generation
from .worker import Cancelled, Emit

# the engine's reasons, as OpenAI names them: a completed grammar is a natural stop, the end
# of the compiled context a length limit
FINISH = {"stop": "stop", "grammar": "stop", "length": "length", "context": "length"}


@dataclass
class Text:
    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # of the tokens since the last


@dataclass
class Finish:
    reason: str
    usage: dict[str, Any]
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # of tokens that wrote no text


class Logprobs:
    """Each generated token's log-probability under the model (before penalties and masks),
    with the `top` most likely alternatives: OpenAI's chat `logprobs.content` entries."""

    def __init__(self, tokenizer: Any, top: int):
        self.pieces, self.top = tokenizer.token_bytes(), top
        self.pending: list[dict[str, Any]] = []

    def add(self, token: int, logits: np.ndarray) -> None:
        logits = np.asarray(logits[: len(self.pieces)], np.float64)
        shifted = logits - logits.max()
        logp = shifted - np.log(np.exp(shifted).sum())
        entry = self._entry(token, logp[token])
        best = np.argpartition(-logp, self.top)[: self.top] if self.top else []
        entry["top_logprobs"] = [self._entry(int(i), logp[i])
                                 for i in sorted(best, key=lambda i: -logp[i])]  # fmt: skip
        self.pending.append(entry)

    def take(self) -> list[dict[str, Any]]:
        taken, self.pending = self.pending, []
        return taken

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.pieces[token]
        return {"token": raw.decode("utf-8", "replace"), "logprob": float(logprob),
                "bytes": list(raw)}  # fmt: skip


def generation(engine: Any, request: Generation):
    """The worker's job for a generation request on `engine`."""

    def work(emit: Emit, cancelled: threading.Event) -> None:
        logprobs = Logprobs(engine.tokenizer, request.logprobs) \
            if request.logprobs is not None else None  # fmt: skip
        generated = 0

        def on_token(token: int, logits: np.ndarray) -> None:
            nonlocal generated
            if cancelled.is_set():
                raise Cancelled
            generated += 1
            if logprobs is not None:
                logprobs.add(token, logits)

        text = []
        # what a previous request left in the KV cache is kept as far as this prompt agrees
        # with it: a conversation's next turn prefills only the new messages
        for piece in engine.generate_text(request.prompt_ids, request.params, request.constraint,
                                          reuse_prefix=True, on_token=on_token):  # fmt: skip
            text.append(piece)
            emit(Text(piece, logprobs.take() if logprobs else []))
        reason = engine.finish_reason
        if request.constraint is not None:
            _check_output(request.constraint, "".join(text), reason)
        usage = {
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": generated,
            "total_tokens": len(request.prompt_ids) + generated,
            "prompt_tokens_details": {"cached_tokens": engine.stats.cached_tokens},
        }
        emit(Finish(FINISH[reason], usage, logprobs.take() if logprobs else []))

    return work


def _check_output(constraint: Any, output: str, reason: str) -> None:
    if reason in ("length", "context"):
        cause = "max_tokens" if reason == "length" else "the model's context"
        raise ApiError(422, f"the output is incomplete: {cause} ran out before the JSON of "
                       "response_format was complete; allow more tokens",
                       param="max_tokens", code="output_incomplete")  # fmt: skip
    problems = constraint.violations(output)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ApiError(422, "the output does not match response_format's schema: "
                       + "; ".join(problems[:3]) + more, param="response_format",
                       code="schema_violation")  # fmt: skip


def embedding(embedder: Any, request: Embedding):
    """The worker's job for an embedding request: emits the [inputs, dim] array."""

    def work(emit: Emit, cancelled: threading.Event) -> None:
        emit(embedder.embed_ids(request.rows))

    return work
