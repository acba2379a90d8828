"""What the llvm schedule rules share: the kernel as the rules see it, and loop helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV

# Below this many output elements a kernel runs on one thread: waking the pool costs more.
PARALLEL_MIN_ELEMENTS = 1 << 15
# Independent accumulators per GEMV row: an FMA's latency spans several issue slots.
GEMV_CHAINS = 4
FIELD_CHAINS = 2  # a packed GEMV sums a word's fields in this many independent chains
PREFETCH_BYTES = 8192  # how far ahead of its current row a GEMV asks memory for weights
GEMM_COLS = 16  # output columns per parallel task of a GEMM (weight tile rows)
GEMM_UNROLL = 8  # output columns whose accumulators stay in registers together
GEMM_REGISTERS = 32  # vector registers of AVX-512 (AVX2 has half): a GEMM tile's budget
GEMM_ROWS = 128  # rows of a GEMM's row block: its transposed x (K x 128 floats) stays in L2
MIN_WORD = 4  # fewer values "packed" per word than this are pairs (RoPE), not a word


@dataclass
class Kernel:
    """The blocks of a PrimFunc under the root block, as the rules see them."""

    sch: s_tir.Schedule
    blocks: list[SBlockRV]
    target: tvm.target.Target
    # [N, ...] buffers a rule reads row by row, one row per task, for its finish step
    row_streams: list[tirx.Var] = field(default_factory=list)
    # the matmuls over packed weights that quantize their activations to int8: "prefill"
    # (int8.py), "decode" (int8_gemv.py)
    int8: frozenset[str] = frozenset()

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

    def one_nest_per_block(self) -> bool:
        """Whether the root holds one loop nest per block, in block order: what a rule that
        splices new statements in place of some blocks' nests needs."""
        root = self.get(self.sch.get_sblock("root"))
        return isinstance(root.body, tirx.SeqStmt) and len(root.body.seq) == len(self.blocks)

    def lanes(self) -> int:
        """float32 lanes in one of this CPU's widest vector registers (kernels accumulate in
        float32, whatever their activation dtype)."""
        bits = tvm.target.codegen.llvm_get_vector_width(self.target)
        return max(1, (bits if bits > 0 else 128) // 32)


@dataclass
class Rule:
    """A named schedule rule: `apply` schedules the kernel and returns True if it matches;
    `finish`, if any, rewrites the scheduled PrimFunc (what schedule primitives cannot do)."""

    name: str
    apply: Callable[[Kernel], bool]
    finish: Callable[[tirx.PrimFunc, Kernel], tirx.PrimFunc] | None = None


# -- small helpers ------------------------------------------------------------------------
def extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def divisor(n: int | None, limit: int) -> int:
    """The largest divisor of n that is at most limit (1 for unknown n)."""
    if n is None:
        return 1
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def divisors(kernel: Kernel, block: SBlockRV, var: tirx.Var) -> list[int]:
    """Every c in `var // c` or `var % c` read by the block."""
    found = []

    def visit(e):
        if isinstance(e.b, tirx.IntImm) and e.a.same_as(var):
            found.append(int(e.b.value))

    tvm_ffi.structural_walk(kernel.get(block).body, ((tirx.FloorDiv, tirx.FloorMod), visit))
    return found


def packing(kernel: Kernel, block: SBlockRV, var: tirx.Var) -> int | None:
    """The smallest c in `var // c` or `var % c` read by the block: values packed c per word."""
    return min(divisors(kernel, block, var), default=None)


def vector_lanes(kernel: Kernel, block: SBlockRV, var: tirx.Var, extent: int | None) -> int:
    """Vector lanes for a loop over `var`: the widest register, dividing the extent.

    With values packed c to a word (`var // c`), a vector covers one or two whole words:
    LLVM loads two words as one and spreads them with a permute, then shifts each lane by
    its own amount; more words would be a gather. Pairs (RoPE's) get one pair per vector,
    so that the choice between a pair's two formulas folds away.
    """
    lanes = kernel.lanes()
    per_word = packing(kernel, block, var)
    if per_word is not None and per_word < lanes:
        lanes = min(lanes, 2 * per_word) if per_word >= MIN_WORD else per_word
    return divisor(extent, lanes)


def vectorize_inner(kernel: Kernel, block: SBlockRV) -> None:
    """Vectorize a block's innermost loop in chunks of the widest register (if it is static)."""
    sch = kernel.sch
    inner = sch.get_loops(block)[-1]
    lanes = vector_lanes(kernel, block, kernel.get(block).iter_vars[-1].var, extent(sch, inner))
    if lanes > 1:
        sch.vectorize(sch.split(inner, [None, lanes])[1])


def elements(kernel: Kernel, loops: list[LoopRV]) -> int:
    """Iterations of a loop nest, counting a symbolic extent (a row count) as 1."""
    total = 1
    for loop in loops:
        total *= extent(kernel.sch, loop) or 1
    return total


def inline_chain(kernel: Kernel, blocks: list[SBlockRV]) -> SBlockRV:
    """Inline every elementwise block but the last one into its consumers; return the last."""
    for block in blocks[:-1]:
        kernel.sch.compute_inline(block)
    return blocks[-1]


def is_elementwise(kernel: Kernel, block: SBlockRV) -> bool:
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




def substitute_vars(node, renames: dict):
    return tvm_ffi.structural_map(node, (tirx.Var, lambda v: renames.get(v, v)))


def uses(expr, var: tirx.Var) -> bool:
    """Whether `var` appears in `expr`."""
    found = []
    tvm_ffi.structural_walk(expr, (tirx.Var, lambda v: found.append(v.same_as(var))))
    return any(found)


def coefficient(expr, var: tirx.Var) -> int | None:
    """c in `expr = c * var + (terms free of var)`, else None."""
    if expr.same_as(var):
        return 1
    if isinstance(expr, tirx.Mul):
        if expr.a.same_as(var) and isinstance(expr.b, tirx.IntImm):
            return int(expr.b.value)
        if expr.b.same_as(var) and isinstance(expr.a, tirx.IntImm):
            return int(expr.a.value)
        return None
    if isinstance(expr, tirx.Add):
        if not uses(expr.a, var):
            return coefficient(expr.b, var)
        if not uses(expr.b, var):
            return coefficient(expr.a, var)
    return None
