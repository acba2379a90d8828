"""CPU schedules for the plan's kernels, picked by pattern (block structure, iter kinds, shapes).

Like dlight's rules, but for the kernels tapml.nn produces: a matmul with one output row
(decode GEMV), a matmul with many rows (prefill GEMM), a row reduction followed by
elementwise blocks (RMSNorm), elementwise kernels, and independent rows with bodies of
their own (the hand-written attention). Kernels that match no rule are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV

ATTR = "tapml.schedule"
# Below this many output elements a kernel runs on one thread: waking the pool costs more.
PARALLEL_MIN_ELEMENTS = 1 << 15
# Independent accumulators per GEMV row: an FMA's latency spans several issue slots.
GEMV_CHAINS = 4
GEMM_COLS = 16  # output columns per parallel task of a GEMM (weight tile rows)
GEMM_UNROLL = 4  # output columns whose accumulators stay in registers together
MIN_WORD = 4  # fewer values "packed" per word than this are pairs (RoPE), not a word


@dataclass
class Kernel:
    """The blocks of a PrimFunc under the root block, as the rules see them."""

    sch: s_tir.Schedule
    blocks: list[SBlockRV]
    target: tvm.target.Target

    def get(self, block: SBlockRV) -> s_tir.SBlock:
        return self.sch.get(block)

    def kinds(self, block: SBlockRV) -> str:
        """Iter kinds of a block: "S" data parallel, "R" reduction, "O" anything else."""
        names = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
        return "".join(names.get(int(v.iter_type), "O") for v in self.get(block).iter_vars)

    def is_simple(self, block: SBlockRV) -> bool:
        """A block whose body is one store, with loops straight above it (no opaque code)."""
        return isinstance(self.get(block).body, tirx.BufferStore)

    def is_injective(self, block: SBlockRV) -> bool:
        return self.is_simple(block) and set(self.kinds(block)) == {"S"}

    def lanes(self) -> int:
        """float32 lanes in one of this CPU's widest vector registers (kernels accumulate in
        float32, whatever their activation dtype)."""
        bits = tvm.target.codegen.llvm_get_vector_width(self.target)
        return max(1, (bits if bits > 0 else 128) // 32)


@dataclass
class Rule:
    """A named schedule rule: `apply` schedules the kernel and returns True if it matches."""

    name: str
    apply: Callable[[Kernel], bool]


# -- small helpers ------------------------------------------------------------------------
def _extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _divisor(n: int | None, limit: int) -> int:
    """The largest divisor of n that is at most limit (1 for unknown n)."""
    if n is None:
        return 1
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _packing(kernel: Kernel, block: SBlockRV, var: tirx.Var) -> int | None:
    """The smallest c in `var // c` or `var % c` read by the block: values packed c per word."""
    divisors = []

    def visit(e):
        if isinstance(e.b, tirx.IntImm) and e.a.same_as(var):
            divisors.append(int(e.b.value))

    tvm_ffi.structural_walk(kernel.get(block).body, ((tirx.FloorDiv, tirx.FloorMod), visit))
    return min(divisors) if divisors else None


def _lanes(kernel: Kernel, block: SBlockRV, var: tirx.Var, extent: int | None) -> int:
    """Vector lanes for a loop over `var`: the widest register, dividing the extent.

    With values packed c to a word (`var // c`), a vector covers one or two whole words:
    LLVM loads two words as one and spreads them with a permute, then shifts each lane by
    its own amount; more words would be a gather. Pairs (RoPE's) get one pair per vector,
    so that the choice between a pair's two formulas folds away.
    """
    lanes = kernel.lanes()
    packing = _packing(kernel, block, var)
    if packing is not None and packing < lanes:
        lanes = min(lanes, 2 * packing) if packing >= MIN_WORD else packing
    return _divisor(extent, lanes)


def _vectorize_inner(kernel: Kernel, block: SBlockRV) -> None:
    """Vectorize a block's innermost loop in chunks of the widest register (if it is static)."""
    sch = kernel.sch
    inner = sch.get_loops(block)[-1]
    lanes = _lanes(kernel, block, kernel.get(block).iter_vars[-1].var, _extent(sch, inner))
    if lanes > 1:
        sch.vectorize(sch.split(inner, [None, lanes])[1])


def _elements(kernel: Kernel, loops: list[LoopRV]) -> int:
    """Iterations of a loop nest, counting a symbolic extent (a row count) as 1."""
    total = 1
    for loop in loops:
        total *= _extent(kernel.sch, loop) or 1
    return total


def _inline_chain(kernel: Kernel, blocks: list[SBlockRV]) -> SBlockRV:
    """Inline every elementwise block but the last one into its consumers; return the last."""
    for block in blocks[:-1]:
        kernel.sch.compute_inline(block)
    return blocks[-1]


def _is_elementwise(kernel: Kernel, block: SBlockRV) -> bool:
    """Every read of the block is at exactly the block's own iteration point."""
    stmt = kernel.get(block)
    point = [v.var for v in stmt.iter_vars]
    for region in stmt.reads:
        mins = [r.min for r in region.region]
        if len(mins) != len(point):
            return False
        if not all(m.same_as(v) for m, v in zip(mins, point, strict=True)):
            return False
    return True


# -- matmul: [weight stages], C[m, n] = sum_k x[m, k] * w[n, k], [elementwise epilogue] ----
@dataclass
class Matmul:
    producers: list[SBlockRV]
    reduction: SBlockRV
    epilogue: list[SBlockRV]
    rows: int  # M


def _match_matmul(kernel: Kernel) -> Matmul | None:
    """One static [M, N, K] reduction reading x[m, k], with only elementwise blocks around."""
    reductions = [i for i, b in enumerate(kernel.blocks) if "R" in kernel.kinds(b)]
    if len(reductions) != 1:
        return None
    i = reductions[0]
    block = kernel.blocks[i]
    if not kernel.is_simple(block) or kernel.kinds(block) != "SSR":
        return None
    others = kernel.blocks[:i] + kernel.blocks[i + 1 :]
    if not all(kernel.is_injective(b) for b in others):
        return None
    extents = [_extent(kernel.sch, loop) for loop in kernel.sch.get_loops(block)]
    if None in extents or _x_read(kernel, block) is None:
        return None
    return Matmul(kernel.blocks[:i], block, kernel.blocks[i + 1 :], extents[0])


def _x_read(kernel: Kernel, block: SBlockRV) -> int | None:
    """Index (in the block's reads) of the activations x[m, k] of a matmul block."""
    m, _, k = (v.var for v in kernel.get(block).iter_vars)
    for i, read in enumerate(kernel.get(block).reads):
        mins = [r.min for r in read.region]
        if len(mins) == 2 and mins[0].same_as(m) and mins[1].same_as(k):
            return i
    return None


def _gemv(kernel: Kernel) -> bool:
    """One output row: each task reduces whole rows of the weight, vectorized along K.

    The reduction is split into GEMV_CHAINS independent vector accumulators (rfactor),
    summed at the end of each row; with packed weights a vector covers whole words (see
    `_lanes`).
    """
    match = _match_matmul(kernel)
    if match is None or match.rows != 1:
        return False
    sch = kernel.sch
    for block in match.producers:
        sch.compute_inline(block)
    block = match.reduction
    _, n, k = sch.get_loops(block)
    lanes = _lanes(kernel, block, kernel.get(block).iter_vars[2].var, _extent(sch, k))
    chains = _divisor(_extent(sch, k) // lanes, GEMV_CHAINS)
    _, k_chain, k_lane = sch.split(k, [None, chains, lanes])
    rf = sch.rfactor(sch.fuse(k_chain, k_lane), factor_axis=0)
    _, n, k_outer, k_inner = sch.get_loops(rf)
    k_chain, k_lane = sch.split(k_inner, [chains, lanes])
    sch.unroll(k_chain)
    sch.vectorize(k_lane)
    # Sum the chains as vectors first: a scalar sum of all chains * lanes is a long
    # dependent chain at the end of every row.
    partial = None
    if chains > 1:
        r_chain, r_lane = sch.split(sch.get_loops(block)[-1], [chains, lanes])
        partial = sch.rfactor(r_lane, factor_axis=0)
        sch.reverse_compute_at(partial, n)
        r_lane, r_chain = sch.get_loops(partial)[-2:]
        sch.reorder(r_chain, r_lane)
        sch.vectorize(r_lane)
    sch.reverse_compute_at(block, n)
    if match.epilogue:
        sch.reverse_compute_at(_inline_chain(kernel, match.epilogue), n)
    if _extent(sch, n) * _extent(sch, k_outer) * lanes >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(n)
    sch.decompose_reduction(rf, k_outer)
    if partial is not None:
        sch.decompose_reduction(partial, r_chain)
    return True


def _gemm(kernel: Kernel) -> bool:
    """Many output rows: vectorized along the rows, each weight element read once.

    x is transposed once per call so that a weight element multiplies a contiguous vector
    of rows; weight stages that do work (dequantization) fill a tile per task, vectorized
    along K, while plain casts are read in place. GEMM_UNROLL output columns times up to
    two vectors of rows accumulate in registers over all of K.
    """
    match = _match_matmul(kernel)
    if match is None or match.rows == 1:
        return False
    sch = kernel.sch
    block = match.reduction
    staged = []
    for producer in match.producers:
        if _is_elementwise(kernel, producer):
            sch.compute_inline(producer)
        else:
            staged.append(producer)
    x_t = sch.cache_read(block, _x_read(kernel, block), "global")
    sch.transform_layout(x_t, ("write", 0), lambda m, k: (k, m))
    acc = sch.cache_write(block, 0, "global")
    sch.transform_layout(block, ("write", 0), lambda m, n: (n, m))

    m, n, k = sch.get_loops(block)
    cols = _divisor(_extent(sch, n), GEMM_COLS)
    unroll = _divisor(cols, GEMM_UNROLL)
    n_task, n_group, n_unroll = sch.split(n, [None, cols // unroll, unroll])
    m_outer, m_inner = sch.split(m, [None, _divisor(match.rows, 2 * kernel.lanes())])
    sch.reorder(n_task, n_group, m_outer, k, n_unroll, m_inner)
    sch.vectorize(m_inner)
    sch.unroll(n_unroll)
    sch.reverse_compute_at(acc, n_group)
    if match.epilogue:
        last = _inline_chain(kernel, match.epilogue)
        sch.reverse_compute_at(last, n_group)
    for producer in reversed(staged):  # consumers first
        sch.compute_at(producer, n_task)
        _vectorize_inner(kernel, producer)
    sch.parallel(n_task)
    sch.decompose_reduction(block, k)
    return True


# -- row reduction (RMSNorm): s[i] = sum_k f(x[i, k]); y[i, j] = g(x[i, j], s[i]) -------------
def _row_reduction(kernel: Kernel) -> bool:
    """Rows in parallel (if large), the sum vectorized in lanes, the output vectorized."""
    if not all(kernel.is_simple(b) for b in kernel.blocks):
        return False
    kinds = [kernel.kinds(b) for b in kernel.blocks]
    if len(kinds) < 2 or not kinds[0].endswith("R") or kinds[0].count("R") != 1:
        return False
    if any(set(k) != {"S"} for k in kinds[1:]):
        return False
    sch = kernel.sch
    reduce_block = kernel.blocks[0]
    last = _inline_chain(kernel, kernel.blocks[1:])
    k = sch.get_loops(reduce_block)[-1]
    lanes = _divisor(_extent(sch, k), kernel.lanes())
    rf = None
    if lanes > 1:
        _, k_lane = sch.split(k, [None, lanes])
        rf = sch.rfactor(k_lane, factor_axis=len(kernel.kinds(reduce_block)) - 1)
    loops = sch.get_loops(last)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.compute_at(reduce_block, row)
    if rf is not None:
        sch.compute_at(rf, row)
        lane, k_outer = sch.get_loops(rf)[-2:]
        sch.reorder(k_outer, lane)
        sch.vectorize(lane)
    _vectorize_inner(kernel, last)
    if _elements(kernel, sch.get_loops(last)) >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(row)
    if rf is not None:
        sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
    return True


# -- elementwise (gathers, copies, RoPE, casts) -------------------------------------------------
def _elementwise(kernel: Kernel) -> bool:
    """Outer loops fused (and parallel if large), the innermost loop vectorized."""
    if not all(kernel.is_injective(b) for b in kernel.blocks):
        return False
    sch = kernel.sch
    last = _inline_chain(kernel, kernel.blocks)
    loops = sch.get_loops(last)
    size = _elements(kernel, loops)
    outer = sch.fuse(*loops[:-1]) if len(loops) > 1 else None
    _vectorize_inner(kernel, last)
    if outer is not None and size >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)
    return True


# -- independent rows with opaque bodies (attention: one query row and head each) --------------
def _independent_rows(kernel: Kernel) -> bool:
    """A single block over spatial loops only, whose body is its own code: rows in parallel."""
    if len(kernel.blocks) != 1 or set(kernel.kinds(kernel.blocks[0])) != {"S"}:
        return False
    if kernel.is_simple(kernel.blocks[0]):
        return False
    loops = kernel.sch.get_loops(kernel.blocks[0])
    kernel.sch.parallel(kernel.sch.fuse(*loops) if len(loops) > 1 else loops[0])
    return True


RULES: list[Rule] = [
    Rule("gemv", _gemv),
    Rule("gemm", _gemm),
    Rule("row_reduction", _row_reduction),
    Rule("elementwise", _elementwise),
    Rule("independent_rows", _independent_rows),
]


def _already_scheduled(func: tirx.PrimFunc) -> bool:
    found = []
    tvm_ffi.structural_walk(
        func.body, (tirx.For, lambda f: found.append(f.kind != tirx.ForKind.SERIAL))
    )
    return any(found)


def schedule_func(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """The PrimFunc scheduled by the first rule that matches it, tagged with the rule's name."""
    if _already_scheduled(func):
        return func
    for rule in RULES:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        kernel = Kernel(sch, list(sch.get_child_blocks(root)), target)
        if rule.apply(kernel):
            return sch.mod["main"].with_attr(ATTR, rule.name)
    return func


def schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule each PrimFunc of `mod` for the llvm `target`; others are left unchanged."""
    funcs = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            func = schedule_func(func, target)
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)
