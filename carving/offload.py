"""Offload: run the plan with some kernels on the target device and the rest on the source.

An evaluation run is a scenario's runs (a causal LM's prefill and decode steps under teacher
forcing: the source's greedy tokens are fed; an embedding model's batches of texts), with the
kernels of an offloaded set on the target; every run's results (the logits, the embeddings)
are compared with the all-source run's. Offloading orders the plan's N kernels and offloads
growing prefixes of that order: all N first, and if that diverges, a bisection over the
prefix length finds the first kernel whose offloading makes the results diverge, in at most
ceil(log2 N) + 2 evaluation runs (the all-source reference and all N included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tapml.errors import TapmlError
from tapml.fileio import write_atomic
from tapml.plan import KERNEL_KINDS, Plan

from .runs import Run, drive

log = logging.getLogger("tapml")
FORMAT, VERSION = "tapml-offload", 1
# max |result - source result| / max |source result| (logits, embeddings) over every run of
# an evaluation
TOLERANCES = {"float32": 2e-3, "float16": 2e-2}
SOURCE, TARGET = "source", "target"


class SplitRun:
    """Runs a plan's calls each on the source or the target, moving buffers between them.

    Both executors hold every buffer; `fresh[name]` says which sides hold its current value.
    A call on one side first copies in each argument only the other side has.
    """

    def __init__(self, plan: Plan, source: Any, target: Any):
        self.plan, self.executors = plan, {SOURCE: source, TARGET: target}
        self.moved_bytes = self.moves = 0
        self.fresh: dict[str, set[str]] = {}
        self.reset()

    def reset(self) -> None:
        for executor in self.executors.values():
            executor.reset_state()
        both = {SOURCE, TARGET}
        self.fresh = {n: set(both) for n in self.plan.buffers if self.plan.root(n) == n}

    def run(self, function: str, scalars: dict[str, int], inputs: dict[str, np.ndarray],
            offloaded: frozenset[str]) -> np.ndarray:  # fmt: skip
        f = self.plan.functions[function]
        for name, array in inputs.items():
            for executor in self.executors.values():
                executor.upload(name, array)
            self.fresh[name] = {SOURCE, TARGET}
        for index, call in enumerate(f["calls"]):
            side = TARGET if call["kernel"] in offloaded else SOURCE
            for arg in call["args"]:
                if "buffer" in arg:
                    self._bring(self.plan.root(arg["buffer"]), side)
            self.executors[side].launch(function, index, scalars)
            for name in call["writes"]:
                self.fresh[self.plan.root(name)] = {side}
        output = self.plan.root(f["outputs"][0])
        side = SOURCE if SOURCE in self.fresh[output] else TARGET
        return self.executors[side].download(output)

    def _bring(self, name: str, side: str) -> None:
        if side in self.fresh[name]:
            return
        other = TARGET if side == SOURCE else SOURCE
        array = self.executors[other].download(name)
        self.executors[side].upload(name, array)
        self.fresh[name].add(side)
        self.moves += 1
        self.moved_bytes += array.nbytes


@dataclass
class Evaluation:
    """One evaluation run: how many kernels of the order were offloaded, and the divergence."""

    offloaded: int
    divergence: float  # worst over the runs
    per_run: list[float]
    ok: bool
    seconds: float
    moves: int = 0
    moved_bytes: int = 0


@dataclass
class Result:
    order: list[str]
    tolerance: float
    evaluations: list[Evaluation] = field(default_factory=list)
    culprit: str | None = None  # the first kernel whose offloading diverges
    resumed: int = 0  # evaluations taken from an earlier, interrupted offload

    @property
    def migrated(self) -> bool:
        return self.culprit is None and any(
            e.offloaded == len(self.order) and e.ok for e in self.evaluations)  # fmt: skip

    @property
    def runs(self) -> int:
        """Evaluation runs this offload needed, the all-source reference included."""
        return 1 + len(self.evaluations)


def kernel_order(plan: Plan, order: str) -> list[str]:
    """The plan's distinct kernels in first-use order ("plan") or grouped by kind ("kind")."""
    kernels = plan.kernels
    if order == "plan":
        return kernels
    if order != "kind":
        raise TapmlError(f"unknown offload order {order!r}; choose plan or kind")

    def kind(kernel: str) -> int:
        return KERNEL_KINDS.index(plan.kernel_kinds[kernel])

    return sorted(kernels, key=lambda k: (kind(k), kernels.index(k)))


def forward(split: SplitRun, runs: list[Run], offloaded: frozenset[str],
            tokens: list[int] | None = None) -> tuple[list[np.ndarray], list[int]]:  # fmt: skip
    """Every run's results and the tokens decoding was fed: `tokens` (teacher forcing) or,
    without them, the greedy choices."""
    split.reset()
    return drive(runs, lambda run, inputs: split.run(run.function, run.scalars, inputs,
                                                     offloaded), tokens)  # fmt: skip


def divergence(got: list[np.ndarray], want: list[np.ndarray]) -> list[float]:
    return [float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want, strict=True)]


class Offloader:
    """Finds how much of the plan runs on the target, resuming from a state file."""

    def __init__(self, split: SplitRun, runs: list[Run], order: list[str], tolerance: float,
                 state: Path | None = None, state_key: str = "",
                 progress: Callable[[str], None] | None = None):  # fmt: skip
        self.split, self.runs, self.order, self.tolerance = split, runs, order, tolerance
        self.state, self.state_key = state, state_key
        self.progress = progress or (lambda message: None)
        self.reference: list[np.ndarray] = []
        self.tokens: list[int] = []
        self.done: dict[int, Evaluation] = self._load_state()

    def offload(self) -> Result:
        result = Result(self.order, self.tolerance)
        self.progress(f"reference: every kernel on the source ({len(self.runs)} runs)")
        self.reference, self.tokens = forward(self.split, self.runs, frozenset())
        n = len(self.order)
        full = self._evaluate(n, result)
        if full.ok:
            return result
        good, bad = 0, n  # prefix lengths known to match / to diverge
        while bad - good > 1:
            mid = (good + bad) // 2
            if self._evaluate(mid, result).ok:
                good = mid
            else:
                bad = mid
        result.culprit = self.order[bad - 1]
        assert result.runs <= math.ceil(math.log2(max(n, 1))) + 2
        return result

    def _evaluate(self, k: int, result: Result) -> Evaluation:
        offloaded = frozenset(self.order[:k])
        if k in self.done:
            evaluation = self.done[k]
            result.resumed += 1
            self.progress(f"{k} of {len(self.order)} kernels on the target: divergence "
                          f"{evaluation.divergence:.2e} (recorded earlier)")  # fmt: skip
        else:
            self.progress(f"{k} of {len(self.order)} kernels on the target ...")
            moves, moved = self.split.moves, self.split.moved_bytes
            start = time.perf_counter()
            got, _ = forward(self.split, self.runs, offloaded, self.tokens)
            per_run = divergence(got, self.reference)
            worst = max(per_run)
            evaluation = Evaluation(k, worst, per_run, bool(worst <= self.tolerance),
                                    time.perf_counter() - start, self.split.moves - moves,
                                    self.split.moved_bytes - moved)  # fmt: skip
            self.done[k] = evaluation
            self._save_state()
            self.progress(f"{k} of {len(self.order)} kernels on the target: divergence "
                          f"{worst:.2e} ({'match' if evaluation.ok else 'DIVERGES'})")
        result.evaluations.append(evaluation)
        return evaluation

    def _load_state(self) -> dict[int, Evaluation]:
        if self.state is None or not self.state.is_file():
            return {}
        try:
            state = json.loads(self.state.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is corrupt: starting the offload over", self.state)
            return {}
        if state.get("format") != FORMAT or state.get("key") != self.state_key:
            return {}  # another model, target, kernels, order or scenario: start over
        return {e["offloaded"]: Evaluation(**e) for e in state["evaluations"]}

    def _save_state(self) -> None:
        if self.state is not None:
            state = {"format": FORMAT, "version": VERSION, "key": self.state_key,
                     "evaluations": [asdict(e) for e in self.done.values()]}  # fmt: skip
            write_atomic(self.state, json.dumps(state, indent=1).encode())


def state_key(*parts: Any) -> str:
    """What an offload's recorded steps depend on: a change in any of them starts over."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
