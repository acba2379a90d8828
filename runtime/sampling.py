"""Choosing the next token from logits: penalties, temperature, top-k/top-p/min-p, a seeded draw."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tapml.errors import GenerationError

# top-p first tries the most likely tokens only: when they already hold top_p of the mass, the
# nucleus is among them and the full vocabulary (49152 for SmolLM2) need not be sorted
_NUCLEUS_GUESSES = (256, 4096)


def greedy(logits: np.ndarray) -> int:
    """The most likely token (the lowest id among ties, as llama.cpp's greedy sampler)."""
    return int(np.argmax(logits))


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; the defaults are greedy decoding of 64 tokens.

    temperature 0 is greedy (penalties still apply). top_k 0, top_p 1 and min_p 0 turn those
    filters off. The penalties are 1.0 (repetition) and 0.0 (presence, frequency) when off.
    `stop` strings end the text before them (`Engine.generate`); `stop_token_ids` end
    generation like the model's own end-of-turn tokens. `seed` None draws a fresh seed.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 64
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # a single string is one stop string, not one per character
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        problems = []

        def check(ok: bool, name: str, want: str) -> None:
            if not ok:
                problems.append(f"{name}={getattr(self, name)!r} (want {want})")

        def finite(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, (int, float)) and math.isfinite(value)

        check(finite("temperature") and self.temperature >= 0, "temperature", ">= 0; 0 is greedy")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0; 0 is off")
        check(finite("top_p") and 0 < self.top_p <= 1, "top_p", "0 < top_p <= 1; 1 is off")
        check(finite("min_p") and 0 <= self.min_p <= 1, "min_p", "0 <= min_p <= 1; 0 is off")
        check(
            finite("repetition_penalty") and self.repetition_penalty > 0,
            "repetition_penalty", "> 0; 1 is off",
        )  # fmt: skip
        for name in ("presence_penalty", "frequency_penalty"):
            check(finite(name) and -2 <= getattr(self, name) <= 2, name, "-2..2; 0 is off")
        check(
            self.seed is None or (_is_int(self.seed) and self.seed >= 0),
            "seed", "None or an integer >= 0",
        )  # fmt: skip
        check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"
        )  # fmt: skip
        check(
            all(_is_int(i) and i >= 0 for i in self.stop_token_ids),
            "stop_token_ids", "token ids >= 0",
        )  # fmt: skip
        if problems:
            raise GenerationError(f"invalid sampling parameters: {'; '.join(problems)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks next tokens for one generation: `sampler(logits, generated, prompt)` -> id.

    The steps, in order:
    1. penalties: the repetition penalty (llama.cpp's and HF's: a positive logit is divided by
       it, a negative one multiplied) applies to every id in the prompt *and* the generated
       ids, as HF's; the presence and frequency penalties (OpenAI's: logit -= frequency *
       count + presence) count the *generated* ids only, the tokens that were sampled.
    2. temperature: 0 returns the most likely token (the lowest id among ties);
    3. top-k, 4. top-p (the smallest set of most likely tokens holding top_p of the
       probability), 5. min-p (tokens at least min_p times as likely as the most likely),
       each on the distribution renormalized after the step before;
    6. a draw from a numpy Generator seeded with `seed`: the same seed gives the same ids for
       the same logits.
    """

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(
        self, logits: np.ndarray, generated: Sequence[int] = (), prompt: Sequence[int] = ()
    ) -> int:
        """The next token id after `prompt` + `generated`, given the model's `logits` [vocab]."""
        logits = self.penalize(logits, generated, prompt)
        if self.params.greedy:
            token = greedy(logits)
            if logits[token] == -np.inf:
                raise GenerationError(_ALL_MASKED)
            return token
        ids, probs = self.candidates(logits)
        cumulative = np.cumsum(probs)
        # searchsorted on the running sum: one uniform draw per token, reproducible by seed
        i = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])

    def penalize(
        self, logits: np.ndarray, generated: Sequence[int] = (), prompt: Sequence[int] = ()
    ) -> np.ndarray:
        """`logits` after the repetition, presence and frequency penalties (a copy if any)."""
        p = self.params
        repeat = p.repetition_penalty != 1 and (len(prompt) or len(generated))
        counted = (p.presence_penalty or p.frequency_penalty) and len(generated)
        if not (repeat or counted):
            return logits
        logits = np.array(logits, dtype=np.float32)
        if repeat:
            seen = np.unique(np.concatenate([np.asarray(prompt, np.int64),
                                             np.asarray(generated, np.int64)]))  # fmt: skip
            values = logits[seen]
            logits[seen] = np.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if counted:
            ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
            logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
        return logits

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids that survive temperature, top-k, top-p and min-p, and their probabilities.

        Probabilities are float64 and sum to 1; the ids are in no particular order. Greedy
        (temperature 0) leaves the single most likely id.
        """
        p = self.params
        logits = np.asarray(logits)
        top = float(logits.max())
        if top == -np.inf:
            raise GenerationError(_ALL_MASKED)
        if p.greedy:
            return np.array([greedy(logits)]), np.ones(1)
        vocab = len(logits)
        if 0 < p.top_k < vocab:
            ids = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
            scaled = logits[ids].astype(np.float64) / p.temperature
        else:
            ids = np.arange(vocab)
            scaled = logits.astype(np.float64) / p.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if p.top_p < 1:
            ids, probs = _nucleus(ids, probs, p.top_p)
        if p.min_p > 0:
            keep = probs >= p.min_p * probs.max()
            ids, probs = ids[keep], probs[keep]
            probs /= probs.sum()
        return ids, probs


_ALL_MASKED = "every token has a logit of -inf (a grammar that allows nothing next?)"


def _nucleus(ids: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most likely ids whose probabilities sum to at least top_p."""
    order = None
    for guess_size in _NUCLEUS_GUESSES:
        if len(probs) <= guess_size:
            break
        guess = np.argpartition(-probs, guess_size - 1)[:guess_size]
        if probs[guess].sum() >= top_p:
            order = guess[np.argsort(-probs[guess])]
            break
    if order is None:
        order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    # the first position where the running sum reaches top_p, inclusive (with slack for the
    # rounding of the sum: 0.5 + 0.4 must reach 0.9)
    n = min(int(np.searchsorted(cumulative, top_p - 1e-9, side="left")) + 1, len(order))
    kept = order[:n]
    return ids[kept], probs[kept] / probs[kept].sum()


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
