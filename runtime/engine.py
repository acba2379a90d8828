"""A compiled model ready to generate: plan + kernels on an executor, tokenizer and KV state."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tapml.compiler import describe
from tapml.errors import GenerationError
from tapml.plan import Plan
from tapml.tokenizer import StreamDecoder, Tokenizer

from .sampling import greedy


@dataclass
class Stats:
    """Token counts and seconds of the last generation."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    """Runs a compiled artifact: prefill in fixed chunks, decode one token at a time."""

    def __init__(self, artifact: Path, verify_weights: bool = True):
        from tapml.targets import load_executor
        from tapml.weights import load_shards

        self.artifact = Path(artifact)
        self.config = describe(self.artifact)
        options = self.config["options"]
        self.target = options["target"]
        self.max_context, self.chunk = options["max_context"], options["chunk"]
        self.plan = Plan.load(self.artifact / "plan.json")
        self.tokenizer = Tokenizer.load(self.artifact / "tokenizer")
        self.executor = load_executor(self.target, self.plan, self.artifact)
        self.executor.load_params(load_shards(self.artifact / "weights", verify=verify_weights))
        self.pos = 0
        self.stats = Stats()

    def reset(self) -> None:
        self.executor.reset_state()
        self.pos = 0

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Feed `ids` at the current position; returns the logits after the last one."""
        if not ids:
            raise GenerationError("cannot prefill an empty prompt")
        self._check_room(len(ids))
        logits = None
        for start in range(0, len(ids), self.chunk):
            part = list(ids[start : start + self.chunk])
            tokens = np.zeros(self.chunk, "int32")
            tokens[: len(part)] = part
            scalars = {"pos": self.pos, "n_valid": len(part)}
            logits = self.executor.run("prefill", scalars, {"prefill.tokens": tokens})
            self.pos += len(part)
        return logits[0]

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the current position; returns the next token's logits."""
        self._check_room(1)
        token_input = {"decode.token": np.array([token], "int32")}
        logits = self.executor.run("decode", {"pos": self.pos}, token_input)
        self.pos += 1
        return logits[0]

    def _check_room(self, n: int) -> None:
        if self.pos + n > self.max_context:
            raise GenerationError(
                f"{self.pos + n} tokens do not fit the compiled context of {self.max_context}; "
                "shorten the prompt or compile with a larger --max-context"
            )

    def generate_ids(self, prompt_ids: Sequence[int], max_tokens: int) -> Iterator[int]:
        """Greedy ids after the prompt, until a stop token, `max_tokens` or the context's end."""
        if len(prompt_ids) >= self.max_context:
            raise GenerationError(
                f"the prompt has {len(prompt_ids)} tokens; the model was compiled for a context "
                f"of {self.max_context} (compile with a larger --max-context)"
            )
        self.reset()
        self.stats = Stats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        logits = self.prefill(prompt_ids)
        self.stats.prefill_seconds = time.perf_counter() - start
        stop = set(self.tokenizer.stop_ids)
        for i in range(max_tokens):
            token = greedy(logits)
            if token in stop:
                return
            yield token
            if i + 1 == max_tokens or self.pos >= self.max_context:
                return
            start = time.perf_counter()
            logits = self.decode(token)
            self.stats.decode_seconds += time.perf_counter() - start
            self.stats.decode_tokens += 1

    def generate(self, prompt: str, max_tokens: int = 64, chat: bool = False) -> Iterator[str]:
        """Stream the completion of `prompt` as text pieces (greedy decoding)."""
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = self.tokenizer.encode(prompt)
        stream = StreamDecoder(self.tokenizer, skip_special=True)
        for token in self.generate_ids(ids, max_tokens):
            piece = stream.add(token)
            if piece:
                yield piece
        tail = stream.flush()
        if tail:
            yield tail
