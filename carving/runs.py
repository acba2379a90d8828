"""Runs: what a scenario asks of the plan's entry points, made as the plan's task says.

A run is one entry point's (function, scalars, inputs) for an executor, and the rows of its
output that are results: a causal LM's prefill chunks and decode steps (`schedule`), or a
sentence encoder's batches of texts padded into buckets (`batches`). `drive` runs them in
order, feeding each decode step a token; carving and offloading both run scenarios through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tapml.plan import CausalLM
    from tapml.runtime.embedder import Embedder

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Run:
    """One entry-point run of a scenario: its step number, the plan's (function, scalars,
    inputs), and how many rows of its output are results. A decode step's input is the token
    the run before it chose, so its inputs come from `feed(token)`."""

    step: int
    function: str
    scalars: dict[str, int]
    given: Inputs = field(default_factory=dict, repr=False)
    feed: Callable[[int], Inputs] | None = field(default=None, repr=False)
    rows: int = 1

    @property
    def decodes(self) -> bool:
        return self.feed is not None

    def inputs(self, token: int | None = None) -> Inputs:
        """The run's inputs: its own, or `token`'s for a decode step."""
        return self.given if self.feed is None else self.feed(token)

    def result(self, output: np.ndarray) -> np.ndarray:
        """The rows of the entry point's output that are results: the last token's logits, or
        each text's embedding (not a padded batch's empty rows)."""
        return output[: self.rows]


def schedule(prompt_ids: Sequence[int], scenario: Any, task: CausalLM) -> list[Run]:
    """A causal LM's runs: prefill chunks (the last one padded), then `scenario.decode_steps`
    decode steps."""
    runs = []
    for start in range(0, len(prompt_ids), task.chunk):
        chunk = list(prompt_ids[start : start + task.chunk])
        runs.append(Run(len(runs), *task.prefill(start, chunk)))
    for pos in range(len(prompt_ids), len(prompt_ids) + scenario.decode_steps):
        function, scalars, _ = task.decode(pos, 0)
        runs.append(Run(len(runs), function, scalars,
                        feed=lambda token, pos=pos: task.decode(pos, token)[2]))  # fmt: skip
    return runs


def batches(requests: Sequence[Sequence[Sequence[int]]], embedder: Embedder) -> list[Run]:
    """A sentence encoder's runs: each request's rows of token ids in the batches the embedder
    makes of them (the shortest bucket that holds a row, batches as large as it allows)."""
    runs = []
    for rows in requests:
        for bucket, members in embedder.batches([len(r) for r in rows]):
            call = embedder.task.call(bucket, [rows[i] for i in members])
            runs.append(Run(len(runs), *call, rows=len(members)))
    return runs


def drive(runs: Sequence[Run], call: Callable[[Run, Inputs], np.ndarray],
          tokens: Sequence[int] | None = None) -> tuple[list[np.ndarray], list[int]]:  # fmt: skip
    """Run `runs` in order, each by `call(run, inputs)` -> the entry point's output. Returns
    every run's results and the tokens its decode steps were fed: `tokens` (teacher forcing)
    or, without them, the greedy choice after the run before."""
    results: list[np.ndarray] = []
    fed: list[int] = []
    for run in runs:
        if run.decodes:
            fed.append(tokens[len(fed)] if tokens is not None else int(np.argmax(results[-1])))
        results.append(run.result(call(run, run.inputs(fed[-1] if fed else None))))
    return results, fed
