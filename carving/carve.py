"""Carve: run the real model on the source executor and record chosen kernel calls.

Each scenario's runs (a causal LM's prefill chunks and greedy decode steps, an embedding
model's batches of texts; see runs.py) go through the source. Which calls to keep is decided
before running, from the plan alone (a run's scalars and the layer a call's weights belong to
are known in advance): per kernel, the first call, then the calls that add the most unseen
scalar values, entry points, layers and steps. A kept call stores its arguments as they were
before the launch (the buffers it only writes start zeroed), and the written ones after it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapml.errors import SuiteError
from tapml.fileio import write_atomic
from tapml.plan import Plan, evaluate

from .runs import Inputs, Run, drive
from .scenarios import AnyScenario, check
from .suite import FORMAT, VERSION, ArrayStore, Suite, tolerance

log = logging.getLogger("tapml")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Event:
    """A kernel call the scenario will make, with what makes it different from others."""

    step: int
    function: str
    index: int
    kernel: str
    values: tuple[tuple[int, Any], ...]  # (argument position, scalar value)
    layer: int | None


def events(plan: Plan, runs: list[Run]) -> Iterator[Event]:
    for run in runs:
        for index, call in enumerate(plan.functions[run.function]["calls"]):
            values = tuple((i, evaluate(a["scalar"], run.scalars))
                           for i, a in enumerate(call["args"]) if "scalar" in a)  # fmt: skip
            layers = {int(m.group(1)) for a in call["args"] if "buffer" in a
                      for m in [LAYER.search(a["buffer"])] if m}  # fmt: skip
            layer = layers.pop() if len(layers) == 1 else None
            yield Event(run.step, run.function, index, call["kernel"], values, layer)


# what a call adds to a kernel's coverage, and how much each kind of novelty counts
WEIGHTS = {"value": 2, "function": 2, "layer": 1, "step": 1}


def _traits(e: Event) -> set[tuple]:
    return ({("value", *v) for v in e.values}
            | {("function", e.function), ("layer", e.layer), ("step", e.step)})  # fmt: skip


def choose(candidates: list[Event], limit: int) -> list[Event]:
    """Up to `limit` calls of one kernel: the first, then the most novel (latest on ties)."""
    chosen = [candidates[0]]
    seen = _traits(candidates[0])

    def novelty(e: Event) -> int:
        return sum(WEIGHTS[t[0]] for t in _traits(e) - seen)

    while len(chosen) < min(limit, len(candidates)):
        # max keeps the first of equals: over the reversed list, the latest call
        best = max(reversed(candidates), key=novelty)
        if novelty(best) == 0:
            break
        chosen.append(best)
        seen |= _traits(best)
    return chosen


def select(plan: Plan, runs: list[Run], limit: int) -> tuple[dict[tuple[int, int], Event], dict]:
    """The calls to record by (step, call index), and how many calls each kernel makes."""
    by_kernel: dict[str, list[Event]] = defaultdict(list)
    for e in events(plan, runs):
        by_kernel[e.kernel].append(e)
    keep = {(e.step, e.index): e for group in by_kernel.values() for e in choose(group, limit)}
    return keep, {k: len(group) for k, group in by_kernel.items()}


class Carver:
    """Records a scenario's chosen calls from a runtime's executor (an Engine's, an
    Embedder's) into a suite's arrays."""

    def __init__(self, runtime: Any, store: ArrayStore, limit: int):
        self.runtime, self.store, self.limit = runtime, store, limit
        self.fresh = {f: fresh_outputs(runtime.plan, f) for f in runtime.plan.functions}

    def scenario(self, scenario: AnyScenario, progress: Any = None) -> dict[str, Any]:
        ids = scenario.ids(self.runtime)  # once: a text cut to the longest bucket warns
        runs = scenario.runs(self.runtime, ids)
        keep, counts = select(self.runtime.plan, runs, self.limit)
        self.runtime.executor.reset_state()
        calls: list[dict[str, Any]] = []
        seen: set = set()

        def run(r: Run, inputs: Inputs) -> np.ndarray:
            output = self._run(scenario, r, inputs, keep, calls, seen)
            if progress is not None:
                progress.update(1)
            return output

        _, fed = drive(runs, run)
        return {"scenario": scenario.to_dict(), **scenario.record(ids, fed),
                "kernel_calls": counts, "calls": calls}  # fmt: skip

    def _run(self, scenario: AnyScenario, run: Run, inputs: Inputs, keep: dict, calls: list,
             seen: set) -> np.ndarray:  # fmt: skip
        executor, plan = self.runtime.executor, self.runtime.plan
        fresh = self.fresh[run.function]
        f = executor.begin_run(run.function, run.scalars, inputs)
        for index, call in enumerate(f["calls"]):
            if (run.step, index) not in keep:
                executor.launch(run.function, index, run.scalars)
                continue
            args = []
            for a in call["args"]:
                if "scalar" in a:
                    args.append({"scalar": evaluate(a["scalar"], run.scalars)})
                    continue
                b = plan.buffers[a["buffer"]]
                args.append({"buffer": a["buffer"], "dtype": b["dtype"], "shape": b["shape"]})
                if a["buffer"] in fresh[index]:
                    # zeroed, so whatever a kernel leaves unwritten is the same on replay
                    executor.upload(a["buffer"], np.zeros(b["shape"], b["dtype"]))
                else:
                    args[-1]["before"] = self.store.put(executor.download(a["buffer"]))
            seconds = executor.time_call(run.function, index, run.scalars)
            key = (call["kernel"], tuple(a.get("before", a.get("scalar")) for a in args))
            if key in seen:  # the same inputs again: nothing new to test
                continue
            seen.add(key)
            for a in args:
                if a.get("buffer") in call["writes"]:
                    a["output"] = True
                    a["after"] = self.store.put(executor.download(a["buffer"]))
                    a["tolerance"] = tolerance(a["dtype"])
            calls.append({
                "id": f"{scenario.name}/{run.step}/{index}",
                "kernel": call["kernel"], "scenario": scenario.name, "function": run.function,
                "step": run.step, "index": index, "layer": keep[run.step, index].layer,
                "scalars": run.scalars,
                "args": args, "source_seconds": seconds,
            })  # fmt: skip
        return executor.download(f["outputs"][0])


def fresh_outputs(plan: Plan, function: str) -> list[set[str]]:
    """Per call, the buffers it writes without reading: first writes of temps and outputs.

    Anything else it writes (KV state, a buffer written before) it updates in place, so that
    buffer's previous contents are an input of the call.
    """
    written: set[str] = set()
    fresh = []
    for call in plan.functions[function]["calls"]:
        fresh.append({name for name in call["writes"] if name not in written
                      and plan.buffers[name]["kind"] in ("temp", "output")})  # fmt: skip
        written |= set(call["writes"])
    return fresh


def carve(
    artifact: Path,
    out: Path,
    scenarios: list[AnyScenario],
    model: str,
    max_calls: int = 3,
    progress: bool = True,
) -> Suite:
    """Carve `scenarios` on the compiled source `artifact` into the suite directory `out`.

    Finished scenarios are kept in `out/scenarios/`, so an interrupted carve resumes with the
    first unfinished one; the manifest is written (atomically) once all are done.
    """
    from tqdm import tqdm

    from tapml.artifact import Artifact, describe
    from tapml.runtime.engine import load_runtime

    out = Path(out)
    config = describe(artifact)
    settings = {"model": model, "source": config["options"]["target"],
                "quantization": config["options"]["quantization"],
                "options": config["options"], "max_calls_per_kernel": max_calls}  # fmt: skip
    _check_settings(out, settings)
    done = {s.name: _load_scenario(out, s) for s in scenarios}
    todo = [s for s in scenarios if done[s.name] is None]
    if len(todo) < len(scenarios):
        log.info("resuming %s: %d of %d scenarios carved already", out,
                 len(scenarios) - len(todo), len(scenarios))  # fmt: skip
    if todo:
        runtime = load_runtime(artifact)
        check(todo, runtime.plan.task["kind"])
        carver = Carver(runtime, ArrayStore(out / "arrays"), max_calls)
        total = sum(len(s.runs(runtime)) for s in todo)
        with tqdm(total=total, desc="carving", unit="run", disable=not progress) as bar:
            for s in todo:
                bar.set_postfix_str(s.name)
                done[s.name] = carver.scenario(s, bar)
                write_atomic(_scenario_path(out, s.name), json.dumps(done[s.name]).encode())
    plan_model = Artifact(artifact).plan().model
    suite = Suite(out, {"format": FORMAT, "version": VERSION, **settings,
                        "plan_model": plan_model, **_merge(list(done.values()))})
    suite.save()
    return suite


_CARVED = ("scenario", "kernel_calls", "calls")  # a carved scenario's fields besides its ids


def _merge(scenarios: list[dict[str, Any]]) -> dict[str, Any]:
    kernels: dict[str, dict[str, int]] = {}
    for s in scenarios:
        for kernel, n in s["kernel_calls"].items():
            k = kernels.setdefault(kernel, {"calls": 0, "kept": 0})
            k["calls"] += n
        for call in s["calls"]:
            kernels[call["kernel"]]["kept"] += 1
    return {
        # each scenario's definition and the ids its runs were given (Scenario.record)
        "scenarios": [{**s["scenario"], **{k: v for k, v in s.items() if k not in _CARVED}}
                      for s in scenarios],  # fmt: skip
        "kernels": kernels,
        "calls": [c for s in scenarios for c in s["calls"]],
    }


def _scenario_path(out: Path, name: str) -> Path:
    return out / "scenarios" / f"{name}.json"


def _load_scenario(out: Path, scenario: AnyScenario) -> dict[str, Any] | None:
    """A finished scenario's record, if it was carved with the same definition."""
    path = _scenario_path(out, scenario.name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SuiteError(f"{path} is corrupt ({e}); delete it to carve that scenario again") from e
    return record if record.get("scenario") == scenario.to_dict() else None


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix calls carved with other settings into one suite."""
    path = out / "carve.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SuiteError(f"{path} is corrupt ({e}); carve into a new directory") from e
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise SuiteError(f"{out} holds a suite carved with other settings ({', '.join(changed)}"
                             "); carve into a new directory with -o")  # fmt: skip
    elif out.exists() and any(out.iterdir()):
        raise SuiteError(f"{out} exists and is not a carved suite; choose a new directory")
    else:
        write_atomic(path, json.dumps(settings, indent=1).encode())
