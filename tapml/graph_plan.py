"""An imported graph's plan: each entry point's Relax module (`OnnxGraph.relax_module`) fused
and read into a plan, the entry points merged into one plan sharing weights, and one-element
weights made immediates in the kernels that read them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from .graph import OnnxGraph, Shape, shape_text, shapes_text

log = logging.getLogger("tapml")


def entry_name(shapes: Mapping[str, Shape]) -> str:
    """An entry point's function name: `graph_1x3x48x320` (every input's shape, in order)."""
    return "graph_" + "_".join(shape_text(s) for s in shapes.values())


def build_graph_plan(graph: OnnxGraph, entries: list[dict[str, Shape]], meta: dict[str, Any]
                     ) -> tuple[dict[str, Any], Any, dict[str, np.ndarray]]:  # fmt: skip
    """(kernels by name, plan, weights by parameter name) of the graph with one entry point
    per item of `entries` (`OnnxGraph.entries`), all sharing the weights.

    The plan's task (docs/formats.md, "Task") is kind "graph": the ONNX names of the inputs
    and outputs, and per entry point the plan buffers that take and give them. Each entry
    point is imported and fused alone (the frontend names its kernels alike at every shape),
    then merged: a kernel or weight another entry point has with other contents is renamed.
    """
    from tapml.lower import plan_memory
    from tapml.plan import Plan

    merged = Plan({}, {}, {}, meta, {"kind": "graph", "inputs": list(graph.inputs),
                                     "outputs": graph.outputs})  # fmt: skip
    kernels: dict[str, Any] = {}
    weights: dict[str, np.ndarray] = {}
    for shapes in entries:
        fname = entry_name(shapes)
        log.info("importing %s at %s", graph.path.name, shapes_text(shapes))
        plan, entry_kernels, entry_weights = _entry_plan(graph, shapes, fname, meta)
        renames = {}
        for name, value in entry_weights.items():
            renames[name] = _merge_weight(weights, name, value, fname)
        for name, func in entry_kernels.items():
            renames[name] = _merge_kernel(kernels, name, func, fname)
        _rename(plan, renames)
        merged.buffers.update(plan.buffers)
        merged.functions.update(plan.functions)
        merged.kernel_kinds.update(plan.kernel_kinds)
        merged.task[fname] = {
            "function": fname,
            "inputs": dict(zip(graph.inputs, plan.functions[fname]["inputs"], strict=True)),
            "outputs": dict(zip(graph.outputs, plan.functions[fname]["outputs"], strict=True)),
        }
    _inline_scalars(merged, kernels, weights)
    merged.storages = plan_memory(merged)
    merged.validate()
    return kernels, merged, weights


def _entry_plan(graph: OnnxGraph, shapes: Mapping[str, Shape], fname: str, meta: dict[str, Any]
                ) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    """(plan, kernels, weights) of one entry point: the weights only those its kernels read
    (the import leaves shape tensors it consumed among the parameters)."""
    import tvm

    from tapml.lower import extract_plan, fuse, kernel_functions

    module, params = graph.relax_module(shapes)
    functions = {tvm.ir.GlobalVar(fname) if gv.name_hint == "main" else gv:
                 func.with_attr("global_symbol", fname) if gv.name_hint == "main" else func
                 for gv, func in module.functions_items()}  # fmt: skip
    fused = fuse(tvm.IRModule(functions), [fname])
    constants: dict[str, np.ndarray] = {}
    plan = extract_plan(fused, list(params), [], meta, {"graph": {"function": fname}}, constants)
    used = {plan.root(arg["buffer"]) for call in plan.functions[fname]["calls"]
            for arg in call["args"] if "buffer" in arg}  # fmt: skip
    for name in plan.names("param"):
        if name not in used:
            del plan.buffers[name]
    weights = {n: v for n, v in {**params, **constants}.items() if n in plan.buffers}
    kernels = {k: f for k, f in kernel_functions(fused).items() if k in plan.kernel_kinds}
    return plan, kernels, weights


def _merge_weight(weights: dict[str, np.ndarray], name: str, value: np.ndarray, fname: str) -> str:
    """Where `value` goes among `weights`: under `name`, or where the same values already are
    (a folded constant), or else under a name of its entry point's."""
    candidates = weights if name.startswith("const.") else {name: weights.get(name)}
    for known_name, known in candidates.items():
        if known is not None and known.dtype == value.dtype and known.shape == value.shape \
                and np.array_equal(known, value):  # fmt: skip
            return known_name
    if name in weights or name.startswith("const."):
        name = f"{fname}.{name}"
    weights[name] = value
    return name


def _merge_kernel(kernels: dict[str, Any], name: str, func: Any, fname: str) -> str:
    import tvm_ffi

    if name in kernels and not tvm_ffi.structural_equal(kernels[name], func):
        name = f"{name}_{fname}"
    kernels[name] = func.with_attr("global_symbol", name)
    return name


def _inline_scalars(plan: Any, kernels: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    """Make each one-element weight a kernel reads (Clip's bounds, HardSigmoid's slope) an
    immediate in that kernel instead of a buffer: WebGPU allows a kernel only 8 storage
    buffers, which a convolution with its fused activation's constants exceeds. A kernel
    called with other values gets a copy per set of values. Updates all three in place."""
    originals = dict(kernels)
    specialized: dict[tuple, str] = {}
    for f in plan.functions.values():
        for call in f["calls"]:
            values = {i: weights[a["buffer"]] for i, a in enumerate(call["args"])
                      if a.get("buffer") in weights and weights[a["buffer"]].size == 1}  # fmt: skip
            if not values:
                continue
            kernel = call["kernel"]
            key = (kernel, *((i, str(v.dtype), v.item()) for i, v in values.items()))
            if key not in specialized:
                copies = sum(k[0] == kernel for k in specialized)
                name = kernel if not copies else f"{kernel}_c{copies}"
                kernels[name] = _with_immediates(originals[kernel], values).with_attr(
                    "global_symbol", name)  # fmt: skip
                plan.kernel_kinds[name] = plan.kernel_kinds[kernel]
                specialized[key] = name
            call["kernel"] = specialized[key]
            call["args"] = [a for i, a in enumerate(call["args"]) if i not in values]
    read = {plan.root(a["buffer"]) for f in plan.functions.values() for call in f["calls"]
            for a in call["args"] if "buffer" in a}  # fmt: skip
    for name in [n for n in weights if n not in read]:
        del weights[name], plan.buffers[name]


def _with_immediates(func: Any, values: Mapping[int, np.ndarray]) -> Any:
    """The PrimFunc with the one-element buffer parameters at `values`' indices replaced by
    their values, as immediates, wherever they are read."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, tirx
    from tvm.s_tir.stmt import SBlock

    params = list(func.params)
    consts = [(params[i], tirx.const(v.item(), str(v.dtype))) for i, v in values.items()]

    def value_of(buffer: Any) -> Any:
        return next((c for b, c in consts if b.same_as(buffer)), None)

    def load(node: Any, mutator: Any) -> Any:
        const = value_of(node.source)
        return const if const is not None else mutator.default_mutate(node)

    def block(node: Any, mutator: Any) -> Any:
        new = mutator.default_mutate(node)
        reads = [r for r in new.reads if value_of(r.source) is None]
        return SBlock(new.iter_vars, reads, new.writes, new.name_hint, new.body, new.init,
                      new.alloc_buffers, new.match_buffers, new.annotations)  # fmt: skip

    body = tvm_ffi.structural_mutate(func.body, [(tvm.ir.expr.TensorLoad, load), (SBlock, block)])
    gone = {params[i] for i in values}
    new = tirx.PrimFunc([p for p in params if p not in gone], body, func.ret_type, func.attrs)
    # blocks that computed from the values alone now compute constants: inline them
    sch = s_tir.Schedule(new)
    while constant := [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                       if not sch.get(b).reads and sch.get_consumers(b)]:  # fmt: skip
        sch.compute_inline(constant[0])
    return sch.mod["main"]


def _rename(plan: Any, names: Mapping[str, str]) -> None:
    """Rename buffers and kernels of `plan` in place as `names` says."""
    plan.buffers = {names.get(n, n): b for n, b in plan.buffers.items()}
    for b in plan.buffers.values():
        if "base" in b:
            b["base"] = names.get(b["base"], b["base"])
    plan.kernel_kinds = {names.get(k, k): kind for k, kind in plan.kernel_kinds.items()}
    for f in plan.functions.values():
        for call in f["calls"]:
            call["kernel"] = names.get(call["kernel"], call["kernel"])
            for arg in call["args"]:
                if "buffer" in arg:
                    arg["buffer"] = names.get(arg["buffer"], arg["buffer"])
