"""The execution plan: a model's entry points as straight-line lists of kernel calls.

A plan names every buffer (parameters, KV state, inputs, outputs, temporaries placed in
shared storages, and views of other buffers) and, per entry point, the calls that run in
order. The only run-time values are a few scalars (a causal LM's `pos` and `n_valid`); a
scalar argument of a call is a small expression of them, and each entry point lists what
its scalars must satisfy (`requires`). The `task` says how a runtime drives the entry points:
which is which, and which inputs take the tokens. This module has no TVM dependency: it is
what every executor, in any language, interprets. The format is documented in
docs/formats.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PlanError
from .fileio import check_document, read_document, write_atomic

FORMAT = "tapml-plan"
VERSION = 2  # 2: the task, and each function's scalar requirements
BUFFER_KINDS = ("param", "state", "input", "output", "temp", "view")
# what a kernel does (tapml.lower.kernel_kind), simplest first: offloading moves kernels in
# this order when asked to group them by kind
KERNEL_KINDS = ("lookup", "reduction", "elementwise", "opaque", "matmul")


@dataclass
class Plan:
    buffers: dict[str, dict[str, Any]]
    storages: dict[str, int]
    functions: dict[str, dict[str, Any]]
    model: dict[str, Any]
    task: dict[str, Any] = field(default_factory=dict)
    kernel_kinds: dict[str, str] = field(default_factory=dict)  # tapml.lower.kernel_kind

    # -- buffers -----------------------------------------------------------------
    def root(self, name: str) -> str:
        """The buffer that owns the memory `name` refers to (views resolve to their base)."""
        while self.buffers[name]["kind"] == "view":
            name = self.buffers[name]["base"]
        return name

    def nbytes(self, name: str) -> int:
        b = self.buffers[name]
        return int(np.prod(b["shape"], dtype=np.int64)) * np.dtype(b["dtype"]).itemsize

    def names(self, kind: str) -> list[str]:
        return [n for n, b in self.buffers.items() if b["kind"] == kind]

    def owners(self) -> list[str]:
        """The buffers with memory of their own: not temporaries (views of a storage) nor
        views of another buffer."""
        return [n for n, b in self.buffers.items() if b["kind"] not in ("temp", "view")]

    def allocations(self) -> list[int]:
        """The bytes of each allocation an executor makes: the storages, then the owners."""
        return [*self.storages.values(), *(self.nbytes(n) for n in self.owners())]

    @property
    def uses_float16(self) -> bool:
        """Whether any buffer holds float16 (f16 activations, or only the KV cache): a device
        must then read and write 16-bit floats."""
        return any(b["dtype"] == "float16" for b in self.buffers.values())

    @property
    def kernels(self) -> list[str]:
        """Every distinct kernel the plan calls, in order of first use."""
        seen: dict[str, None] = {}
        for f in self.functions.values():
            for call in f["calls"]:
                seen.setdefault(call["kernel"], None)
        return list(seen)

    def state_calls(self, function: str) -> list[int]:
        """The calls of `function` its state depends on (every output but the first, the
        logits), in order: what a prefill chunk whose logits nobody reads must run (not the
        last layer's attention and MLP, nor the output layer)."""
        f = self.functions[function]
        needed = {self.root(n) for n in f["outputs"][1:]}
        kept = []
        for index in reversed(range(len(f["calls"]))):
            call = f["calls"][index]
            if any(self.root(w) in needed for w in call["writes"]):
                kept.append(index)
                needed |= {self.root(a["buffer"]) for a in call["args"] if "buffer" in a}
        return kept[::-1]

    # -- serialization -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "buffers": self.buffers,
            "storages": self.storages,
            "functions": self.functions,
            "task": self.task,
            "kernel_kinds": self.kernel_kinds,
        }

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> Plan:
        d = read_document(path, FORMAT, VERSION, PlanError, "compile the model again",
                          missing=f"plan file not found: {path}")  # fmt: skip
        return cls.from_dict(d, str(path))

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> Plan:
        """A plan from its JSON document (`where` names it in errors), checked."""
        check_document(d, where, FORMAT, VERSION, PlanError, "compile the model again")
        plan = cls(d["buffers"], d["storages"], d["functions"], d["model"], d["task"],
                   d["kernel_kinds"])  # fmt: skip
        plan.validate(where)
        return plan

    def validate(self, where: str = "plan") -> None:
        """Check the references a plan's executors rely on, so they fail here, not mid-run."""
        for name, b in self.buffers.items():
            if b.get("kind") not in BUFFER_KINDS:
                raise PlanError(f"{where}: buffer {name!r} has unknown kind {b.get('kind')!r}")
            if b["kind"] == "view" and b.get("base") not in self.buffers:
                raise PlanError(f"{where}: view {name!r} has no base buffer {b.get('base')!r}")
            if b["kind"] == "temp" and b.get("storage") not in self.storages:
                raise PlanError(f"{where}: temp {name!r} has no storage {b.get('storage')!r}")
        for role, entry in self.task.items():
            if not isinstance(entry, dict):
                continue
            if entry.get("function") not in self.functions:
                raise PlanError(f"{where}: task {role!r} names no function of the plan")
            inputs = self.functions[entry["function"]]["inputs"]
            if "tokens" in entry and entry["tokens"] not in inputs:
                raise PlanError(f"{where}: task {role!r} names no input of {entry['function']}")
        for fname, f in self.functions.items():
            for i, call in enumerate(f["calls"]):
                for arg in call["args"]:
                    if "buffer" in arg and arg["buffer"] not in self.buffers:
                        raise PlanError(
                            f"{where}: {fname} call {i} ({call['kernel']}) uses unknown "
                            f"buffer {arg['buffer']!r}"
                        )

    def check_values(self, name: str, array: np.ndarray) -> None:
        """Refuse values outside the buffer's `range` (token ids past the embedding would
        be read out of bounds)."""
        bounds = self.buffers[name].get("range")
        if bounds is None or array.size == 0:
            return
        low, high = int(array.min()), int(array.max())
        if low < bounds[0] or high >= bounds[1]:
            bad = low if low < bounds[0] else high
            raise PlanError(f"{name} holds {bad}; its values must lie in "
                            f"[{bounds[0]}, {bounds[1]})")  # fmt: skip

    def check_call(self, function: str, index: int, scalars: dict[str, int]) -> dict[str, Any]:
        """Call `index` of `function`, refused unless it exists and the scalars satisfy the
        function's requirements (a single call runs under the same bounds as the whole)."""
        if function not in self.functions:
            raise PlanError(f"the plan has no entry point {function!r}")
        calls = self.functions[function]["calls"]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
                or not 0 <= index < len(calls):  # fmt: skip
            raise PlanError(f"{function} has calls 0..{len(calls) - 1}, not {index!r}")
        self.check_scalars(function, scalars)
        return calls[index]

    def check_scalars(self, function: str, scalars: dict[str, int]) -> None:
        """Refuse scalars a function's `requires` rejects, naming the requirement: the
        kernels would read or write out of bounds."""
        if function not in self.functions:
            raise PlanError(f"the plan has no entry point {function!r}")
        f = self.functions[function]
        for name in f["scalars"]:
            value = scalars.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise PlanError(f"{function} needs an integer {name!r}, got {value!r}")
        for requirement in f.get("requires", []):
            if not evaluate(requirement, scalars):
                values = ", ".join(f"{n}={scalars[n]}" for n in f["scalars"])
                raise PlanError(f"{function} requires {describe_expr(requirement)}; got {values}")


def var(name: str) -> dict[str, str]:
    """The scalar expression of a run-time scalar."""
    return {"var": name}


def op(name: str, *args: Any) -> dict[str, Any]:
    """The scalar expression `name(args...)` (an operator of `_OPS`, "cast" or "select")."""
    return {"op": name, "args": list(args)}


class CausalLM:
    """How to run a causal LM's entry points, as its plan's task names them: each method gives
    (function, scalars, inputs) for an executor's `run`."""

    def __init__(self, plan: Plan):
        task = plan.task
        if task.get("kind") != "causal_lm":
            raise PlanError(f"this plan's task is {task.get('kind')!r}, not a causal LM"
                            + (" (embed texts with `tapml embed`)"
                               if task.get("kind") == "embedding" else ""))
        self.max_context, self.chunk = task["max_context"], task["chunk"]
        self._prefill, self._decode = task["prefill"], task["decode"]

    def prefill(self, pos: int, ids: list[int]) -> tuple[str, dict[str, int], dict[str, Any]]:
        """Up to `chunk` ids at `pos` (padded to a whole chunk)."""
        tokens = np.zeros(self.chunk, "int32")
        tokens[: len(ids)] = ids
        entry = self._prefill
        scalars = {entry["position"]: pos, entry["count"]: len(ids)}
        return entry["function"], scalars, {entry["tokens"]: tokens}

    def decode(self, pos: int, token: int) -> tuple[str, dict[str, int], dict[str, Any]]:
        entry = self._decode
        inputs = {entry["tokens"]: np.array([token], "int32")}
        return entry["function"], {entry["position"]: pos}, inputs


class SentenceEmbedding:
    """How to run a sentence encoder's entry points, as its plan's task names them: one per
    (batch, length) bucket, shortest first, then smallest batch."""

    def __init__(self, plan: Plan):
        task = plan.task
        if task.get("kind") != "embedding":
            raise PlanError(f"this plan's task is {task.get('kind')!r}, not sentence embedding")
        self.dim, self.max_length = task["dim"], task["max_length"]
        self.buckets = sorted((e for e in task.values() if isinstance(e, dict)),
                              key=lambda e: (e["length"], e["batch"]))  # fmt: skip

    def lengths(self) -> list[int]:
        return sorted({b["length"] for b in self.buckets})

    def call(self, bucket: dict[str, Any], rows: Sequence[Sequence[int]]
             ) -> tuple[str, dict[str, int], dict[str, Any]]:  # fmt: skip
        """Up to `batch` rows of ids, each at most `length` long, padded (mask 0)."""
        if len(rows) > bucket["batch"] or any(len(r) > bucket["length"] for r in rows):
            raise PlanError(f"{len(rows)} texts of up to {max(map(len, rows), default=0)} "
                            f"tokens do not fit bucket {bucket['batch']}x{bucket['length']}")
        shape = (bucket["batch"], bucket["length"])
        ids, mask = np.zeros(shape, "int32"), np.zeros(shape, "int32")
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        return bucket["function"], {}, {bucket["tokens"]: ids, bucket["mask"]: mask}


class TensorGraph:
    """How to run an imported graph's entry points, as its plan's task names them: one per set
    of input shapes fixed at compile time, inputs and outputs by the graph's own names."""

    def __init__(self, plan: Plan):
        task = plan.task
        if task.get("kind") != "graph":
            raise PlanError(f"this plan's task is {task.get('kind')!r}, not a graph")
        self.inputs, self.outputs = list(task["inputs"]), list(task["outputs"])
        self.entries = [e for e in task.values() if isinstance(e, dict)]
        self.shapes = [{name: tuple(plan.buffers[b]["shape"]) for name, b in e["inputs"].items()}
                       for e in self.entries]  # fmt: skip
        self._dtypes = {name: plan.buffers[b]["dtype"]
                        for e in self.entries for name, b in e["inputs"].items()}  # fmt: skip

    def entry(self, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The entry point compiled for these inputs' shapes, or a PlanError naming them and
        the shapes there are."""
        if set(inputs) != set(self.inputs):
            raise PlanError(f"the graph takes inputs {', '.join(self.inputs)}, not "
                            f"{', '.join(inputs) or 'none'}")  # fmt: skip
        given = {name: tuple(np.shape(inputs[name])) for name in self.inputs}
        for entry, shapes in zip(self.entries, self.shapes, strict=True):
            if shapes == given:
                return entry
        compiled = "; ".join(_shapes(s) for s in self.shapes)
        raise PlanError(f"the graph is compiled for {compiled}, not {_shapes(given)}")

    def call(self, inputs: Mapping[str, np.ndarray]) -> tuple[str, dict[str, int], dict[str, Any]]:
        entry = self.entry(inputs)
        arrays = {entry["inputs"][n]: np.asarray(a, self._dtypes[n]) for n, a in inputs.items()}
        return entry["function"], {}, arrays


def _shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.items())


def describe_expr(expr: Any) -> str:
    """A scalar expression as text: `pos + n_valid <= 2048`."""
    if isinstance(expr, (int, float)):
        return str(expr)
    if "var" in expr:
        return expr["var"]
    args = [describe_expr(a) for a in expr["args"]]
    if expr["op"] in _SYMBOLS:
        return f" {_SYMBOLS[expr['op']]} ".join(args)
    return f"{expr['op']}({', '.join(args)})"


_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
            "gt": ">", "ge": ">=", "and": "and", "or": "or"}  # fmt: skip


def evaluate(expr: Any, scalars: dict[str, int]) -> int | float:
    """Evaluate a scalar expression: a number, {"var": name} or {"op": name, "args": [...]}."""
    if isinstance(expr, (int, float)):
        return expr
    if "var" in expr:
        return scalars[expr["var"]]
    args = [evaluate(a, scalars) for a in expr["args"]]
    op = expr["op"]
    if op == "cast":
        return int(args[0]) if "int" in expr["dtype"] else float(args[0])
    if op == "select":
        return args[1] if args[0] else args[2]
    return _OPS[op](*args)


def _c_div(a, b):
    return math.trunc(a / b) if isinstance(a, int) and isinstance(b, int) else a / b


_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": _c_div,
    "mod": lambda a, b: int(math.fmod(a, b)),
    "floordiv": lambda a, b: a // b,
    "floormod": lambda a, b: a % b,
    "min": min,
    "max": max,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "and": lambda a, b: a and b,
    "or": lambda a, b: a or b,
    "not": lambda a: not a,
}
