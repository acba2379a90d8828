"""A compiled model ready to generate: plan + kernels on an executor, tokenizer and KV state."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapml.artifact import Artifact
from tapml.errors import GenerationError
from tapml.plan import CausalLM, Plan
from tapml.targets import get_target
from tapml.tokenizer import StreamDecoder, Tokenizer

from .constraint import Constraint
from .sampling import Sampler, SamplingParams


@dataclass
class Stats:
    """Token counts and seconds of the last generation."""

    prompt_tokens: int = 0  # prefilled: the prompt less what the KV cache held already
    cached_tokens: int = 0  # of the prompt, found in the KV cache (`reuse_prefix`)
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Opened:
    """A compiled artifact's parts, its kernels and weights on an executor."""

    path: Path
    config: dict[str, Any]
    target: str
    plan: Plan
    task: Any  # how to drive the plan (CausalLM, SentenceEmbedding, TensorGraph)
    tokenizer: Tokenizer | None  # None for a graph
    executor: Any


def open_artifact(artifact: Path, task: type, verify_weights: bool = True,
                  executor: Any = None) -> Opened:  # fmt: skip
    """Check a compiled artifact and read its plan's `task` (refused before anything loads
    when the plan is of another kind), then load it: `executor` if given (one that already
    holds its kernels and weights, a remote device's, say), else the artifact's target
    executor here, weights loaded."""
    from tapml.startup import mark
    from tapml.targets import load_executor

    artifact = Artifact(artifact)
    artifact.check()  # before the kernels load: a damaged library can crash the process
    plan = artifact.plan()
    driver = task(plan)
    mark("artifact")  # checked, plan read
    with ThreadPoolExecutor(1) as pool:
        # a large vocabulary takes a second to parse (Gemma-3's 262,144 pieces): meanwhile the
        # weights load, mostly in reads that let go of the GIL
        tokenizer = pool.submit(artifact.tokenizer) if artifact.tokenizer_dir.is_dir() else None
        if executor is None:
            executor = load_executor(artifact.target, plan, artifact.path)
            mark("kernels")  # the runtime and kernel library loaded, buffers allocated
            executor.load_params(artifact.weights(verify=verify_weights))
            mark("weights")
        if tokenizer is not None:
            tokenizer = tokenizer.result()
            mark("tokenizer")
    return Opened(artifact.path, artifact.config, artifact.target, plan, driver, tokenizer,
                  executor)  # fmt: skip


def load_runtime(artifact: Path, **kwargs: Any) -> Any:
    """An Engine for a causal LM's artifact, an Embedder for an embedding model's, a
    GraphRunner for an ONNX graph's."""
    from tapml.models import model_task

    from .embedder import Embedder
    from .graph import GraphRunner

    runtimes = {"causal_lm": Engine, "embedding": Embedder, "graph": GraphRunner}
    return runtimes[model_task(artifact)](artifact, **kwargs)


class Engine:
    """Runs a compiled artifact: prefill in fixed chunks, decode one token at a time."""

    def __init__(self, artifact: Path, verify_weights: bool = True, executor: Any = None):
        """`executor`: one that already holds this artifact's kernels and weights (a remote
        device's, say); by default the artifact's target executor here, weights loaded."""
        opened = open_artifact(artifact, CausalLM, verify_weights, executor)
        self.artifact, self.config, self.target = opened.path, opened.config, opened.target
        self.plan, self.tokenizer, self.executor = opened.plan, opened.tokenizer, opened.executor
        self.task = opened.task
        self.max_context, self.chunk = self.task.max_context, self.task.chunk
        self._short = self.chunk // 4 if get_target(self.target).decode_short_prompts else 0
        self.pos = 0
        self.fed: list[int] = []  # the ids the KV cache holds, by position
        self.stats = Stats()
        # why the last generation ended: "stop", "length", "grammar" or "context"
        self.finish_reason: str | None = None

    def reset(self) -> None:
        """Zero the KV cache."""
        self.executor.reset_state()
        self.rewind(0)

    def rewind(self, pos: int) -> None:
        """Go back to position `pos`: the cache keeps the first `pos` tokens' keys and values,
        and what follows is overwritten as new tokens come (no kernel reads past the current
        position)."""
        self.pos = pos
        del self.fed[pos:]

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Feed `ids` at the current position; returns the logits after the last one."""
        if not ids:
            raise GenerationError("cannot prefill an empty prompt")
        self._check_room(len(ids))
        if len(ids) <= self._short:  # cheaper one by one (TargetSpec.decode_short_prompts)
            for token in ids:
                logits = self.decode(token)
            return logits
        for start in range(0, len(ids), self.chunk):
            part = list(ids[start : start + self.chunk])
            step = self.task.prefill(self.pos, part)
            if start + self.chunk < len(ids):  # only the last chunk's logits are read
                self.executor.advance(*step)
            else:
                logits = self.executor.run(*step)
            self.pos += len(part)
            self.fed.extend(part)
        return logits[0]

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the current position; returns the next token's logits."""
        self._check_room(1)
        logits = self.executor.run(*self.task.decode(self.pos, token))
        self.pos += 1
        self.fed.append(token)
        return logits[0]

    def _check_room(self, n: int) -> None:
        if self.pos + n > self.max_context:
            raise GenerationError(
                f"{self.pos + n} tokens do not fit the compiled context of {self.max_context}; "
                "shorten the prompt or compile with a larger --max-context"
            )

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        constraint: Constraint | None = None,
        *,
        max_tokens: int | None = None,
        reuse_prefix: bool = False,
        on_token: Callable[[int, np.ndarray], None] | None = None,
    ) -> Iterator[int]:
        """The ids after the prompt, sampled by `params` (default: greedy).

        `reuse_prefix`: prefill only what follows the longest start of `prompt_ids` that the
        KV cache holds already (the conversation so far, when a chat's next turn comes).

        Generation ends at a stop token (the tokenizer's and `params.stop_token_ids`; not
        yielded), after `max_tokens` (the keyword wins over `params.max_tokens`), when
        `constraint` is complete, or at the end of the compiled context; `finish_reason` then
        says which: "stop", "length", "grammar" or "context". Stop strings are text, handled by
        `generate_text`. With a constraint, each step's logits go through `constraint.mask`
        and each chosen token through `constraint.accept`. `on_token(token, logits)` sees each
        token before it is yielded, with the model's logits it was sampled from (before any
        penalty or mask); an exception it raises ends the generation.
        """
        params = params or SamplingParams()
        max_tokens = params.max_tokens if max_tokens is None else max_tokens
        if len(prompt_ids) >= self.max_context:
            raise GenerationError(
                f"the prompt has {len(prompt_ids)} tokens; the model was compiled for a context "
                f"of {self.max_context} (compile with a larger --max-context)"
            )
        self.finish_reason = None
        # at least the last prompt token is prefilled: its logits give the first new token
        keep = min(_common_prefix(self.fed, prompt_ids), len(prompt_ids) - 1) if reuse_prefix \
            else 0  # fmt: skip
        self.rewind(keep)
        self.stats = Stats(prompt_tokens=len(prompt_ids) - keep, cached_tokens=keep)
        start = time.perf_counter()
        logits = self.prefill(prompt_ids[keep:])
        self.stats.prefill_seconds = time.perf_counter() - start
        sampler = Sampler(params)
        stop = set(self.tokenizer.stop_ids) | set(params.stop_token_ids)
        generated: list[int] = []
        for i in range(max_tokens):
            model_logits = logits
            if constraint is not None:
                logits = constraint.mask(logits)
            token = sampler(logits, generated, prompt_ids)
            if token in stop:
                self.finish_reason = "stop"
                return
            if constraint is not None:
                constraint.accept(token)
            generated.append(token)
            if on_token is not None:
                on_token(token, model_logits)
            yield token
            if constraint is not None and constraint.is_complete():
                self.finish_reason = "grammar"
                return
            if i + 1 == max_tokens:
                self.finish_reason = "length"
                return
            if self.pos >= self.max_context:
                self.finish_reason = "context"
                return
            start = time.perf_counter()
            logits = self.decode(token)
            self.stats.decode_seconds += time.perf_counter() - start
            self.stats.decode_tokens += 1
        self.finish_reason = "length"  # max_tokens == 0

    def generate_text(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        constraint: Constraint | None = None,
        *,
        max_tokens: int | None = None,
        reuse_prefix: bool = False,
        on_token: Callable[[int, np.ndarray], None] | None = None,
    ) -> Iterator[str]:
        """Stream the completion of `prompt_ids` as text pieces, up to a stop string
        (`reuse_prefix` and `on_token` as in `generate_ids`).

        The text before the first of `params.stop` is streamed, the stop string and anything
        after it are not. Text that could be the start of a stop string is held back until the
        next tokens tell (so no piece ever has to be taken back).
        """
        params = params or SamplingParams()
        stream = StreamDecoder(self.tokenizer, skip_special=True)
        ids = self.generate_ids(prompt_ids, params, constraint, max_tokens=max_tokens,
                                reuse_prefix=reuse_prefix, on_token=on_token)  # fmt: skip
        if not params.stop:
            for token in ids:
                piece = stream.add(token)
                if piece:
                    yield piece
            tail = stream.flush()
            if tail:
                yield tail
            return
        pending = ""
        for token in ids:
            pending += stream.add(token)
            cut = _find_stop(pending, params.stop)
            if cut is not None:
                ids.close()
                self.finish_reason = "stop"
                if pending[:cut]:
                    yield pending[:cut]
                return
            held = _held_back(pending, params.stop)
            if len(pending) > held:
                yield pending[: len(pending) - held]
                pending = pending[len(pending) - held :]
        pending += stream.flush()
        cut = _find_stop(pending, params.stop)
        if cut is not None:
            self.finish_reason = "stop"
            pending = pending[:cut]
        if pending:
            yield pending

    def generate(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        chat: bool = False,
        system: str | None = None,
        constraint: Constraint | None = None,
        *,
        max_tokens: int | None = None,
    ) -> Iterator[str]:
        """Stream the completion of `prompt` as text pieces (greedy unless `params` say not).

        `chat` wraps the prompt in the model's chat template, after a `system` message if one
        is given. See `generate_ids` and `generate_text` for when generation ends.
        """
        if system is not None and not chat:
            raise GenerationError("a system prompt needs the chat template: pass chat=True")
        if chat:
            messages = [{"role": "system", "content": system}] if system is not None else []
            messages.append({"role": "user", "content": prompt})
            prompt = self.tokenizer.apply_chat_template(messages)
        ids = self.tokenizer.encode(prompt)
        yield from self.generate_text(ids, params, constraint, max_tokens=max_tokens)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many ids `a` and `b` share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest
