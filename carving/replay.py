"""Replay carved calls on a target's executor and compare every output with the source's.

Each kernel is replayed on an executor of its own, built from a one-kernel plan whose
buffers are the carved arguments, so a kernel that does not compile or launch fails alone.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tapml.errors import ExecutorError
from tapml.plan import Plan

from .suite import EXACT, Suite

OpenExecutor = Callable[[Plan], Any]  # a one-kernel plan -> an executor for the target


@dataclass
class CallResult:
    id: str
    kernel: str
    status: str  # "pass", "fail" or "error"
    max_abs: float = 0.0
    max_rel: float = 0.0
    seconds: float | None = None
    source_seconds: float | None = None
    message: str = ""


@dataclass
class Report:
    suite: dict[str, Any]  # model, quantization, source and scenarios of the suite
    target: str
    device: str
    exact: bool  # replayed on the source platform: outputs must be bit-identical
    calls: list[CallResult] = field(default_factory=list)

    @property
    def failed(self) -> list[CallResult]:
        return [c for c in self.calls if c.status != "pass"]

    def kernels(self) -> list[dict[str, Any]]:
        """One summary per kernel: status, worst errors, mean target and source seconds."""
        groups: dict[str, list[CallResult]] = {}
        for c in self.calls:
            groups.setdefault(c.kernel, []).append(c)
        return [_summary(kernel, calls) for kernel, calls in groups.items()]


def _summary(kernel: str, calls: list[CallResult]) -> dict[str, Any]:
    statuses = {c.status for c in calls}
    seconds = [c.seconds for c in calls if c.seconds is not None]
    source = [c.source_seconds for c in calls if c.source_seconds is not None]
    return {
        "kernel": kernel,
        "status": next(s for s in ("error", "fail", "pass") if s in statuses),
        "calls": len(calls),
        "max_abs": max(c.max_abs for c in calls),
        "max_rel": max(c.max_rel for c in calls),
        "seconds": float(np.mean(seconds)) if seconds else None,
        "source_seconds": float(np.mean(source)) if source else None,
        "messages": list(dict.fromkeys(c.message for c in calls if c.message)),
    }


def matches(pattern: str | None, kernel: str) -> bool:
    """-k: a glob if it has wildcards, else a substring of the kernel's name."""
    if not pattern:
        return True
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(kernel, pattern)
    return pattern in kernel


def replay_plan(suite: Suite, kernel: str, calls: list[dict[str, Any]]) -> Plan:
    """A plan with one entry point per carved call of `kernel`: `c0`, `c1`, ..."""
    buffers, functions = {}, {}
    for i, call in enumerate(calls):
        args, writes = [], []
        for j, a in enumerate(call["args"]):
            if "scalar" in a:
                args.append({"scalar": a["scalar"]})
                continue
            name = f"c{i}.{j}"
            buffers[name] = {"kind": "input", "shape": a["shape"], "dtype": a["dtype"]}
            args.append({"buffer": name})
            if a.get("output"):
                writes.append(name)
        inputs = [a["buffer"] for a in args if "buffer" in a]
        functions[f"c{i}"] = {"scalars": [], "inputs": inputs, "outputs": writes,
                              "calls": [{"kernel": kernel, "args": args, "writes": writes}]}
    return Plan(buffers, {}, functions, dict(suite.manifest["plan_model"]))


def compare(got: np.ndarray, want: np.ndarray, tol: dict[str, float]) -> tuple[bool, float, float]:
    """Whether `got` is within `tol` of `want`, the max abs error and the max scaled error.

    Floats pass where |got - want| <= atol * max|want| + rtol * |want|; a NaN or Inf the
    source did not produce fails; integers must be equal.
    """
    if want.dtype.kind in "iub":
        diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
        worst = float(diff.max()) if diff.size else 0.0
        return worst == 0, worst, worst
    got, want = got.astype(np.float64), want.astype(np.float64)
    same_nonfinite = (np.isnan(got) & np.isnan(want)) | (got == want)
    finite = np.isfinite(want)
    scale = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    diff = np.where(same_nonfinite, 0.0, np.abs(got - want))
    diff = np.where(np.isnan(diff), np.inf, diff)
    worst = float(diff.max()) if diff.size else 0.0
    bound = tol["atol"] * scale + tol["rtol"] * np.abs(np.where(finite, want, 0.0))
    ok = bool(np.all(diff <= bound))
    return ok, worst, worst / scale if scale else worst


def replay(
    suite: Suite,
    target: str,
    open_executor: OpenExecutor,
    device: str,
    kernels: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> Report:
    """Replay every carved call (of the kernels `kernels` accepts) on `target`."""
    from tqdm import tqdm

    exact = target == suite.manifest["source"]
    report = Report(_suite_info(suite), target, device, exact)
    chosen = [k for k in suite.kernels() if kernels is None or kernels(k)]
    calls = [c for c in suite.calls if c["kernel"] in chosen]
    with tqdm(total=len(calls), desc=f"testing on {target}", unit="call",
              disable=not progress) as bar:  # fmt: skip
        for kernel in chosen:
            mine = [c for c in calls if c["kernel"] == kernel]
            bar.set_postfix_str(kernel)
            report.calls += _replay_kernel(suite, kernel, mine, open_executor, exact)
            bar.update(len(mine))
    return report


def _replay_kernel(suite: Suite, kernel: str, calls: list[dict[str, Any]],
                   open_executor: OpenExecutor, exact: bool) -> list[CallResult]:  # fmt: skip
    try:
        executor = open_executor(replay_plan(suite, kernel, calls))
    except ExecutorError as e:
        return [CallResult(c["id"], kernel, "error", message=str(e)) for c in calls]
    try:
        return [_replay_call(suite, executor, f"c{i}", c, exact) for i, c in enumerate(calls)]
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()


def _replay_call(suite: Suite, executor: Any, function: str, call: dict[str, Any],
                 exact: bool) -> CallResult:  # fmt: skip
    result = CallResult(call["id"], call["kernel"], "pass",
                        source_seconds=call.get("source_seconds"))  # fmt: skip
    names = [f"{function}.{j}" for j in range(len(call["args"]))]
    buffers = [(n, a) for n, a in zip(names, call["args"], strict=True) if "buffer" in a]
    befores = {n: _before(suite, a) for n, a in buffers}
    try:
        for n, array in befores.items():
            executor.upload(n, array)
        executor.time_call(function, 0, {})  # the first launch may build pipelines
        for n, a in buffers:  # in-place kernels changed their inputs: start over
            if a.get("output"):
                executor.upload(n, befores[n])
        result.seconds = executor.time_call(function, 0, {})
        outputs = [(executor.download(n), a) for n, a in buffers if a.get("output")]
    except ExecutorError as e:
        result.status, result.message = "error", str(e)
        return result
    for got, a in outputs:
        want = suite.arrays.get(a["after"], a["dtype"], a["shape"])
        ok, worst, scaled = compare(got, want, EXACT if exact else a["tolerance"])
        result.max_abs, result.max_rel = max(result.max_abs, worst), max(result.max_rel, scaled)
        if not ok:
            result.status = "fail"
            result.message = (f"{a['buffer']}: max |error| {worst:.3g} ({scaled:.3g} of its "
                              "largest value) exceeds the tolerance")  # fmt: skip
    return result


def _before(suite: Suite, arg: dict[str, Any]) -> np.ndarray:
    """An argument as the call found it; a buffer the call only writes starts zeroed."""
    if "before" not in arg:
        return np.zeros(arg["shape"], arg["dtype"])
    return suite.arrays.get(arg["before"], arg["dtype"], arg["shape"])


def _suite_info(suite: Suite) -> dict[str, Any]:
    m = suite.manifest
    return {"path": str(suite.root), "model": m["model"], "quantization": m["quantization"],
            "source": m["source"], "scenarios": [s["name"] for s in m["scenarios"]],
            "calls": len(m["calls"]), "kernels": len(m["kernels"])}  # fmt: skip


def compiled_for(suite: Suite, target: str, progress: bool = True) -> Path:
    """The suite's model compiled for `target` with the suite's settings (cached)."""
    from tapml.api import ensure_compiled
    from tapml.targets import get_target

    m = suite.manifest
    options = m["options"]
    # the source's own CPU options must match for a bit-exact replay; other targets compute
    # as the source did (float32 throughout)
    same = (options["target_options"] if target == m["source"]
            else get_target(target).reference_options())
    return ensure_compiled(m["model"], target, m["quantization"], options["max_context"],
                           options["chunk"], same, progress, options["kv_cache"],
                           options.get("buckets"))  # fmt: skip
