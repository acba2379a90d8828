"""Rules for kernels that are not matmuls: row reductions (RMSNorm), elementwise kernels, and
independent rows with bodies of their own (the hand-written attention)."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.tirx import stmt as tirx_stmt

from .base import (
    PARALLEL_MIN_ELEMENTS,
    Kernel,
    coefficient,
    divisor,
    elements,
    extent,
    inline_chain,
    substitute_vars,
    uses,
    vectorize_inner,
)


# -- row reductions (RMSNorm, LayerNorm, softmax, global pooling): reductions over each row's ---
# -- last axes, with elementwise blocks between and after them ---------------------------------
def row_reduction(kernel: Kernel) -> bool:
    """Rows in parallel (if large), each row's blocks in turn: sums vectorized in lanes,
    elementwise blocks and the output vectorized. A sum over several last axes (a global
    average pool's H and W) is a sum over them fused."""
    if not all(kernel.is_simple(b) for b in kernel.blocks):
        return False
    kinds = [kernel.kinds(b) for b in kernel.blocks]
    reductions = [i for i, k in enumerate(kinds) if "R" in k]
    if not reductions or "R" in kinds[-1]:
        return False
    if any(set(kinds[i].rstrip("R")) - {"S"} for i in reductions):
        return False  # a reduction's axes are its last ones
    if any(set(k) != {"S"} for i, k in enumerate(kinds) if i not in reductions):
        return False
    sch = kernel.sch
    for i in reductions:
        if kinds[i].count("R") > 1:
            sch.fuse(*sch.get_loops(kernel.blocks[i])[-kinds[i].count("R") :])
    last = inline_chain(kernel, kernel.blocks[reductions[-1] + 1 :])
    loops = sch.get_loops(last)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    factored = []
    for block in reversed(kernel.blocks[: reductions[-1] + 1]):  # consumers first
        if "R" not in kernel.kinds(block):
            sch.compute_at(block, row)
            vectorize_inner(kernel, block)
            continue
        rf = _sum_in_lanes(kernel, block)
        sch.compute_at(block, row)
        if rf is not None:
            sch.compute_at(rf, row)
            lane, k_outer = sch.get_loops(rf)[-2:]
            sch.reorder(k_outer, lane)
            sch.vectorize(lane)
            factored.append(rf)
    vectorize_inner(kernel, last)
    if elements(kernel, sch.get_loops(last)) >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(row)
    for rf in factored:
        sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
    return True


def _sum_in_lanes(kernel: Kernel, block) -> object | None:
    """Split a row's sum into vector lanes (rfactor), summed at the end; the lanes' block, or
    None for a row of one vector or less (its sum stays scalar)."""
    sch = kernel.sch
    k = sch.get_loops(block)[-1]
    lanes = divisor(extent(sch, k), kernel.lanes())
    if not 1 < lanes < extent(sch, k):
        return None
    _, k_lane = sch.split(k, [None, lanes])
    return sch.rfactor(k_lane, factor_axis=kernel.kinds(block).count("S"))


# -- elementwise (gathers, copies, RoPE, casts) -------------------------------------------------
def elementwise(kernel: Kernel) -> bool:
    """Blocks that feed others inlined; each output block's outer loops fused (and parallel
    if large), its innermost loop vectorized."""
    if not all(kernel.is_injective(b) for b in kernel.blocks):
        return False
    sch = kernel.sch
    outputs = []
    for block in kernel.blocks:
        if sch.get_consumers(block):
            sch.compute_inline(block)
        else:
            outputs.append(block)
    for block in outputs:
        loops = sch.get_loops(block)
        size = elements(kernel, loops)
        outer = sch.fuse(*loops[:-1]) if len(loops) > 1 else None
        vectorize_inner(kernel, block)
        if outer is not None and size >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(outer)
    return True


# -- independent rows with opaque bodies (attention: one query row and head each) --------------
def independent_rows(kernel: Kernel) -> bool:
    """A single block over spatial loops only, whose body is its own code: rows in parallel.

    The body's lane loops are vectorized afterwards (`_finish_rows`).
    """
    if len(kernel.blocks) != 1 or set(kernel.kinds(kernel.blocks[0])) != {"S"}:
        return False
    if kernel.is_simple(kernel.blocks[0]):
        return False
    loops = kernel.sch.get_loops(kernel.blocks[0])
    row = kernel.sch.fuse(*loops) if len(loops) > 1 else loops[0]
    body_work = _iterations(kernel.get(kernel.blocks[0]).body)
    if body_work is None or extent(kernel.sch, row) * body_work >= PARALLEL_MIN_ELEMENTS:
        kernel.sch.parallel(row)  # else a fork and join would cost more than the rows
    return True


def _iterations(stmt: tirx.Stmt) -> int | None:
    """How many times the innermost statements of `stmt` run, or None if a loop's extent is
    only known at run time."""
    if isinstance(stmt, tirx.For):
        inner = _iterations(stmt.body)
        if inner is None or not isinstance(stmt.extent, tirx.IntImm):
            return None
        return int(stmt.extent) * inner
    if isinstance(stmt, tirx.SeqStmt):
        counts = [_iterations(s) for s in stmt.seq]
        return None if None in counts else sum(counts)
    for name in ("body", "then_case"):  # a block, a let, an if: what it wraps
        if isinstance(getattr(stmt, name, None), tirx.Stmt):
            return _iterations(getattr(stmt, name))
    return 1


def finish_rows(func: tirx.PrimFunc, kernel: Kernel) -> tirx.PrimFunc:
    """An opaque row body's scratch arrays on the stack, its lane loops vectorized."""
    return _vectorize_lane_loops(_local_on_stack(func), kernel)


def _local_on_stack(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """"local" arrays as "global" ones: on a CPU, TVM allocates a small "global" array on the
    stack, where LLVM keeps it in registers, but asks the runtime for a "local" one, once per
    row (what a GPU keeps in registers)."""
    allocs = []
    tvm_ffi.structural_walk(func.body, (tirx_stmt.AllocBuffer, lambda a: allocs.append(a.buffer)))
    renames = {
        b: tirx.decl_buffer(b.shape, b.dtype, b.name, scope="global")
        for b in allocs
        if b.scope() == "local"
    }
    return substitute_vars(func, renames) if renames else func


def _vectorize_lane_loops(func: tirx.PrimFunc, kernel: Kernel) -> tirx.PrimFunc:
    """Vectorize the innermost loops of an opaque body that are elementwise in their variable.

    A loop qualifies if its extent is static and its body is stores only, each at an index
    that moves one to one with the loop variable, and it reads a buffer it writes only at the
    written index: then no iteration depends on another. Such a loop runs in vectors of the
    widest register (and a scalar remainder).
    """
    lanes = kernel.lanes()

    def visit(loop: tirx.For) -> tirx.For:
        if loop.kind != tirx.ForKind.SERIAL or not isinstance(loop.extent, tirx.IntImm):
            return loop
        if not _is_lane_loop(loop):
            return loop
        extent = int(loop.extent)
        width = min(lanes, extent)
        if width < 2:
            return loop
        var, dtype = loop.loop_var, str(loop.extent.ty.dtype)
        whole, rest = divmod(extent, width)
        outer, inner = tirx.Var(f"{var.name}_o", dtype), tirx.Var(f"{var.name}_v", dtype)
        at = outer * tirx.const(width, dtype) + inner
        body = substitute_vars(loop.body, {var: at})
        vector = tirx.For(inner, tirx.const(0, dtype), tirx.const(width, dtype),
                          tirx.ForKind.VECTORIZED, body)  # fmt: skip
        loops = [tirx.For(outer, tirx.const(0, dtype), tirx.const(whole, dtype),
                          tirx.ForKind.SERIAL, vector)]  # fmt: skip
        if rest:
            tail = tirx.Var(f"{var.name}_t", dtype)
            at = tirx.const(whole * width, dtype) + tail
            body = substitute_vars(loop.body, {var: at})
            loops.append(tirx.For(tail, tirx.const(0, dtype), tirx.const(rest, dtype),
                                  tirx.ForKind.SERIAL, body))  # fmt: skip
        return loops[0] if len(loops) == 1 else tirx.SeqStmt(loops)

    return tvm_ffi.structural_map(func, (tirx.For, visit))


def _is_lane_loop(loop: tirx.For) -> bool:
    body = loop.body
    stores = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    if not all(isinstance(st, tirx.BufferStore) for st in stores):
        return False
    var = loop.loop_var
    written = []  # (buffer, indices) of each store
    for st in stores:
        if not st.indices or coefficient(st.indices[-1], var) != 1:
            return False
        if any(uses(i, var) for i in st.indices[:-1]):
            return False
        written.append((st.buffer, st.indices))
    reads_ok = [True]

    def check(load):
        for buffer, indices in written:
            if not load.source.same_as(buffer):
                continue
            same = len(indices) == len(load.indices) and all(
                tvm_ffi.structural_equal(a, b) for a, b in zip(indices, load.indices, strict=True)
            )
            if not same:
                reads_ok[0] = False

    tvm_ffi.structural_walk(body, (tvm.ir.expr.TensorLoad, check))
    return reads_ok[0]
