"""CPU schedules for the plan's kernels, picked by pattern (block structure, iter kinds, shapes).

Like dlight's rules, but for the kernels tapml.nn produces: a matmul with one output row
(decode GEMV), a matmul with many rows (prefill GEMM), a row reduction followed by
elementwise blocks (RMSNorm), elementwise kernels, and independent rows with bodies of
their own (the hand-written attention). Kernels that match no rule are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
import tvm_ffi
from tvm import s_tir, te, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.tirx import stmt as tirx_stmt

ATTR = "tapml.schedule"
# Below this many output elements a kernel runs on one thread: waking the pool costs more.
PARALLEL_MIN_ELEMENTS = 1 << 15
# Independent accumulators per GEMV row: an FMA's latency spans several issue slots.
GEMV_CHAINS = 4
FIELD_CHAINS = 2  # a packed GEMV sums a word's fields in this many independent chains
PREFETCH_BYTES = 8192  # how far ahead of its current row a GEMV asks memory for weights
GEMM_COLS = 16  # output columns per parallel task of a GEMM (weight tile rows)
GEMM_UNROLL = 8  # output columns whose accumulators stay in registers together
MIN_WORD = 4  # fewer values "packed" per word than this are pairs (RoPE), not a word


@dataclass
class Kernel:
    """The blocks of a PrimFunc under the root block, as the rules see them."""

    sch: s_tir.Schedule
    blocks: list[SBlockRV]
    target: tvm.target.Target
    # [N, ...] buffers a rule reads row by row, one row per task, for its finish step
    row_streams: list[tirx.Var] = field(default_factory=list)

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
    """A named schedule rule: `apply` schedules the kernel and returns True if it matches;
    `finish`, if any, rewrites the scheduled PrimFunc (what schedule primitives cannot do)."""

    name: str
    apply: Callable[[Kernel], bool]
    finish: Callable[[tirx.PrimFunc, Kernel], tirx.PrimFunc] | None = None


# -- small helpers ------------------------------------------------------------------------
def _extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _divisor(n: int | None, limit: int) -> int:
    """The largest divisor of n that is at most limit (1 for unknown n)."""
    if n is None:
        return 1
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _divisors(kernel: Kernel, block: SBlockRV, var: tirx.Var) -> list[int]:
    """Every c in `var // c` or `var % c` read by the block."""
    found = []

    def visit(e):
        if isinstance(e.b, tirx.IntImm) and e.a.same_as(var):
            found.append(int(e.b.value))

    tvm_ffi.structural_walk(kernel.get(block).body, ((tirx.FloorDiv, tirx.FloorMod), visit))
    return found


def _packing(kernel: Kernel, block: SBlockRV, var: tirx.Var) -> int | None:
    """The smallest c in `var // c` or `var % c` read by the block: values packed c per word."""
    return min(_divisors(kernel, block, var), default=None)


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


# -- packed GEMV: one output row of a matmul whose weight is unpacked from words ------------
@dataclass
class PackedWeight:
    """w[n, k] = (field k % per_word of words[n, k // per_word] - offset) * scale[n, k // group]."""

    words: tirx.Var
    scale: tirx.Var
    per_word: int
    bits: int
    group: int
    offset: float


def _packed_weight(kernel: Kernel, block: SBlockRV) -> PackedWeight | None:
    """The packed weight a dequantization block unpacks, if its formula is exactly the one
    PackedWeight describes (rebuilt from the constants it uses and compared structurally)."""
    stmt = kernel.get(block)
    if not kernel.is_simple(block) or len(stmt.iter_vars) != 2 or len(stmt.reads) != 2:
        return None
    n, k = (v.var for v in stmt.iter_vars)
    value = stmt.body.value
    sources = [r.source for r in stmt.reads]
    words = [b for b in sources if b.dtype == "uint32"]
    divisors = _divisors(kernel, block, k)
    if len(words) != 1 or not divisors:
        return None
    (words,) = words
    (scale,) = [b for b in sources if not b.same_as(words)]
    per_word, group = min(divisors), max(divisors)
    if 32 % per_word or not isinstance(value, tirx.Mul) or not isinstance(value.a, tirx.Sub):
        return None
    if not isinstance(value.a.b, tirx.FloatImm):
        return None
    w = PackedWeight(words, scale, per_word, 32 // per_word, group, float(value.a.b.value))
    expected = _unpack(w, lambda j: words[n, j], lambda g: scale[n, g], k)
    return w if tvm_ffi.structural_equal(expected, value) else None


def _unpack(w: PackedWeight, word, scale, k):
    """The float32 weight at k as PackedWeight defines it (the formula tapml.nn writes);
    `word(j)` and `scale(g)` read the buffers."""
    f32 = "float32"
    shift = tirx.Cast("uint32", k % w.per_word) * tirx.const(w.bits, "uint32")
    q = (word(k // w.per_word) >> shift) & tirx.const((1 << w.bits) - 1, "uint32")
    s = scale(k // w.group)
    s = s if w.scale.dtype == f32 else s.astype(f32)
    return (q.astype(f32) - tirx.const(w.offset, f32)) * s


def _packed_gemv_te(x: te.Tensor, w: PackedWeight, words: te.Tensor, scale: te.Tensor,
                    lanes: int) -> te.Tensor:  # fmt: skip
    """x [1, K] @ unpacked(words, scale)^T -> [1, N] float32, arranged for vector registers.

    A vector holds `lanes` consecutive words; each of a word's per_word fields is one step
    (a uniform shift), against x permuted once per call (x_words) so that its loads are
    contiguous. A field q becomes the float 1 + q/L (L = 2**bits) by an or of its bits into
    the top of 1.0's mantissa: no int-to-float conversion, which would double the work of the
    FMA ports (measured: 15% off a q4 GEMV on one thread). With x scaled by L (exactly),
    sum_f Lx*(1 + q/L) = sum_f x*q + L*sum_f x. The offset and the group scale leave the
    inner loop: sum_f x*(q - offset)*s = s*(sum_f Lx*(1 + q/L) - sum_f Lx*(1 + offset/L)),
    the last sum once per call. A word's fields are summed in FIELD_CHAINS interleaved
    chains, so that an FMA need not wait for the one before (measured: 3-5% off the q4 GEMVs
    on one thread with their weights in cache; 4 chains gain less than 2). Whole vectors of
    words, then a tail of fewer words; the lanes are summed as a tree.
    """
    f32, pw = "float32", w.per_word
    n_rows, n_words = (int(d) for d in words.shape)
    whole, tail = divmod(n_words, lanes)
    per_group = w.group // pw  # words per scale
    levels = 1 << w.bits

    def xf(k):
        return x[0, k].astype(f32) * tirx.const(levels, f32)

    def field(n, j, f):
        shift = f.astype("uint32") * tirx.const(w.bits, "uint32")
        q = (words[n, j] >> shift) & tirx.const(levels - 1, "uint32")
        one = tirx.const(0x3F800000, "uint32")  # 1.0f
        return tirx.reinterpret(f32, (q << tirx.const(23 - w.bits, "uint32")) | one)

    def sf(n, j):
        s = scale[n, j // per_group]
        return s if scale.dtype == f32 else s.astype(f32)

    offset = tirx.const(1 + w.offset / levels, f32)
    acc = None
    if whole:
        xw = te.compute((whole, pw, lanes), lambda o, f, i: xf((o * lanes + i) * pw + f),
                        name="x_words")  # fmt: skip
        f0 = te.reduce_axis((0, pw), name="f0")
        xo = te.compute((whole, lanes), lambda o, i: te.sum(xw[o, f0, i] * offset, axis=f0),
                        name="x_offset")  # fmt: skip
        chains = FIELD_CHAINS if pw % FIELD_CHAINS == 0 else 1
        per_chain = pw // chains
        f1 = te.reduce_axis((0, per_chain), name="f1")
        dot = te.compute(
            (n_rows, whole, chains, lanes),
            lambda n, o, c, i: te.sum(
                xw[o, c * per_chain + f1, i] * field(n, o * lanes + i, c * per_chain + f1),
                axis=f1,
            ),
            name="word_dot",
        )
        per_vector = lanes // per_group
        scl = te.compute(
            (n_rows, whole, per_vector),
            lambda n, o, g: sf(n, o * lanes + g * per_group),
            name="word_scale",
        )

        def vector_sum(n, i, o):
            fields = dot[n, o, 0, i]
            for c in range(1, chains):
                fields = fields + dot[n, o, c, i]
            return scl[n, o, i // per_group] * (fields - xo[o, i])

        if whole == 1:  # no reduction: a block with none is simpler to schedule
            acc = te.compute((n_rows, lanes), lambda n, i: vector_sum(n, i, 0), name="lane_sum")
        else:
            o = te.reduce_axis((0, whole), name="o")
            acc = te.compute((n_rows, lanes), lambda n, i: te.sum(vector_sum(n, i, o), axis=o),
                             name="lane_sum")  # fmt: skip
    # the tail's words in power-of-two pieces, each added at the tree level of its width
    pieces, j0 = {}, whole * lanes
    for width in (1 << b for b in reversed(range(lanes.bit_length()))):
        if tail & width:
            pieces[width] = _tail_piece(xf, field, scale, offset, j0, width, w, n_rows)
            j0 += width
    level = acc if whole else None
    width = lanes
    while width > 1:
        width //= 2
        level = _halve(level, pieces.get(width), width, n_rows)
    return te.compute((1, n_rows), lambda _, n: level[n, 0], name="gemv")


def _tail_piece(xf, field, scale: te.Tensor, offset, j0: int, width: int, w: PackedWeight,
                n_rows: int):  # fmt: skip
    """(n, i) -> the scaled dot product of words j0 + i (i < width) of row n, as in the main
    part of `_packed_gemv_te` (scales staged per row, so that lanes sharing one are a shuffle,
    not a gather)."""
    pw, per_group = w.per_word, w.group // w.per_word
    xt = te.compute((pw, width), lambda f, i: xf((j0 + i) * pw + f), name=f"x_tail{width}")
    f0 = te.reduce_axis((0, pw), name="f0")
    xo = te.compute((width,), lambda i: te.sum(xt[f0, i] * offset, axis=f0),
                    name=f"x_tail{width}_offset")  # fmt: skip
    f1 = te.reduce_axis((0, pw), name="f1")
    dot = te.compute((n_rows, width),
                     lambda n, i: te.sum(xt[f1, i] * field(n, j0 + i, f1), axis=f1),
                     name=f"tail_dot{width}")  # fmt: skip
    first, last = j0 // per_group, (j0 + width - 1) // per_group
    scl = te.compute((n_rows, last - first + 1),
                     lambda n, g: scale[n, first + g].astype("float32"),
                     name=f"tail_scale{width}")  # fmt: skip
    return lambda n, i: scl[n, (j0 + i) // per_group - first] * (dot[n, i] - xo[i])


def _halve(lanes: te.Tensor | None, piece, width: int, n_rows: int) -> te.Tensor | None:
    """[N, 2 width] -> [N, width]: one step of a tree sum over the lanes, plus the tail piece
    of this width (`piece(n, i)`), if any."""
    if lanes is None and piece is None:
        return None

    def value(n, i):
        if lanes is None:
            return piece(n, i)
        pair = lanes[n, i] + lanes[n, i + width]
        return pair + piece(n, i) if piece is not None else pair

    return te.compute((n_rows, width), value, name=f"lanes{width}")


def _packed_gemv(kernel: Kernel) -> bool:
    """One output row of a matmul with a packed weight: the matmul is rebuilt as
    `_packed_gemv_te` (same result, float32 rounding aside) and its epilogue kept.

    Each task computes whole rows: a row's word vectors accumulate in registers, its words'
    fields are an unrolled sequence of shifts, and its lanes are summed at the end.
    """
    match = _match_matmul(kernel)
    if match is None or match.rows != 1 or len(match.producers) != 1:
        return False
    packed = _packed_weight(kernel, match.producers[0])
    lanes = kernel.lanes()
    if packed is None or lanes < 2 or lanes & (lanes - 1):
        return False
    per_group = packed.group // packed.per_word
    if packed.group % packed.per_word or lanes % per_group:
        return False
    root = kernel.get(kernel.sch.get_sblock("root"))
    if not isinstance(root.body, tirx.SeqStmt) or len(root.body.seq) != len(kernel.blocks):
        return False  # the splice below needs one loop nest per block, in block order
    work = _elements(kernel, kernel.sch.get_loops(match.reduction))
    epilogue_names = [kernel.get(b).name_hint for b in match.epilogue]
    func = _with_packed_gemv(kernel, match, packed, lanes)
    kernel.sch = sch = s_tir.Schedule(func)
    out = sch.get_sblock("gemv")
    _, n = sch.get_loops(out)
    names = {b: sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    row_stages = [b for b, name in names.items()
                  if name.startswith(("lanes", "tail_")) or name == "lane_sum"]  # fmt: skip
    for block in reversed(row_stages):  # consumers first
        sch.compute_at(block, n)
        sch.set_scope(block, 0, "global")  # "local" would allocate a workspace per row
    if work >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(n)  # before reductions are split into init and update
    for block in row_stages:
        name = sch.get(block).name_hint
        # loops of extent 1 are gone after compute_at: a row stage has 0, 1 or 2 of its own
        own = sch.get_loops(block)[2:]
        if name == "lane_sum":
            i, o = own if len(own) == 2 else (own[0], None)
            if o is not None:
                sch.reorder(o, i)
            for stage in ("word_dot", "word_scale"):
                staged = sch.get_sblock(stage)
                sch.compute_at(staged, o if o is not None else n)
                sch.set_scope(staged, 0, "global")
            _chain_steps(sch, sch.get_sblock("word_dot"))
            if lanes > per_group:  # else one scale per vector, and no loop to vectorize
                sch.vectorize(sch.get_loops(sch.get_sblock("word_scale"))[-1])
            sch.vectorize(i)
            if o is not None:
                sch.decompose_reduction(block, o)
        elif name.startswith("tail_dot"):
            _field_steps(sch, block)
        elif name.startswith("tail_scale"):
            if own:
                sch.vectorize(own[-1])
        elif own:
            sch.vectorize(own[-1])
    for block, name in names.items():  # x permuted and summed once per call
        if name.startswith("x_"):
            _lane_steps(sch, block)
    epilogue = [b for b, name in names.items() if name in epilogue_names]
    if epilogue:
        _vectorize_inner(kernel, _inline_chain(kernel, epilogue))
    kernel.row_streams = [packed.words, packed.scale]
    return True


def _prefetch_rows(func: tirx.PrimFunc, kernel: Kernel) -> tirx.PrimFunc:
    """Each task of the parallel row loop first asks memory for the cache lines of the weight
    rows PREFETCH_BYTES ahead. A decode GEMV streams each weight once and lasts only
    microseconds, too short for the hardware prefetchers to ramp up on their own (measured:
    4-8% off a SmolLM2 decode step on 2 threads at 4 KiB ahead, and 5-10% more at 8 KiB
    once the unpacking got cheaper; 16 KiB gains nothing over 8)."""
    words = kernel.row_streams[0]
    n_rows, row_bytes = int(words.shape[0]), int(words.shape[1]) * words.dtype.bits // 8
    ahead = max(1, PREFETCH_BYTES // row_bytes)

    def prefetches(n: tirx.Var) -> list[tirx.Stmt]:
        out = []
        for buf in kernel.row_streams:
            per_line = 64 * 8 // buf.dtype.bits
            for col in range(0, int(buf.shape[1]), per_line):
                address = tirx.address_of(buf[n + ahead, tirx.const(col, "int64")])
                out.append(tirx.Evaluate(prefetch(address)))
        return out

    def visit(loop: tirx.For) -> tirx.For:
        if loop.kind != tirx.ForKind.PARALLEL:
            return loop
        n = loop.loop_var
        ask = tirx.IfThenElse(n + ahead < n_rows, tirx.SeqStmt(prefetches(n)), None)
        return tirx.For(n, loop.min, loop.extent, loop.kind, tirx.SeqStmt([ask, loop.body]),
                        loop.thread_binding, loop.annotations)  # fmt: skip

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, visit)))


def prefetch(address: tirx.PrimExpr) -> tirx.Call:
    """Ask memory for the cache line at `address`: a read, kept in every cache level."""
    i32 = "int32"
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.const(0, i32),
                                 tirx.const(3, i32), tirx.const(1, i32))  # fmt: skip


def _lane_steps(sch: s_tir.Schedule, block: SBlockRV) -> None:
    """A stage of x: its lane loop (the innermost spatial one) vectorized, and a sum over the
    word's fields (the reduction loop of x_offset) done lane-wise, outside it."""
    loops = sch.get_loops(block)
    kinds = [v.iter_type for v in sch.get(block).iter_vars]
    if kinds[-1] == tirx.IterVar.CommReduce:
        lane, fields = loops[-2], loops[-1]
        if len(loops) >= 2 and _extent(sch, lane) not in (None, 1):
            sch.reorder(fields, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(block, fields)
        return
    if _extent(sch, loops[-1]) not in (None, 1):
        sch.vectorize(loops[-1])


def _field_steps(sch: s_tir.Schedule, block: SBlockRV) -> None:
    """A [lanes] x [fields] dot block: fields unrolled outside, lanes vectorized inside."""
    loops = sch.get_loops(block)
    fields = loops[-1]
    if len(loops) > 3 and _extent(sch, loops[-2]) not in (None, 1):
        lane = loops[-2]
        sch.reorder(fields, lane)
        sch.vectorize(lane)
    sch.unroll(fields)
    sch.decompose_reduction(block, fields)


def _chain_steps(sch: s_tir.Schedule, block: SBlockRV) -> None:
    """A [chains] x [lanes] x [fields] dot block: fields unrolled outside, then the chains
    unrolled (independent accumulators, interleaved), lanes vectorized inside."""
    chains, lane, fields = sch.get_loops(block)[-3:]
    sch.reorder(fields, chains, lane)
    sch.vectorize(lane)
    sch.unroll(chains)
    sch.unroll(fields)
    sch.decompose_reduction(block, fields)


def _with_packed_gemv(kernel: Kernel, match: Matmul, w: PackedWeight, lanes: int
                      ) -> tirx.PrimFunc:  # fmt: skip
    """The kernel with its dequantization and matmul blocks replaced by `_packed_gemv_te`'s
    blocks, which write the matmul's result buffer; the epilogue blocks stay as they are."""
    func = kernel.sch.mod["main"]
    reduction = kernel.get(match.reduction)
    x = reduction.reads[_x_read(kernel, match.reduction)].source
    result = reduction.writes[0].source
    placeholders = [te.placeholder([int(d) for d in b.shape], b.dtype, name=b.name)
                    for b in (x, w.words, w.scale)]  # fmt: skip
    core = te.create_prim_func([*placeholders,
                                _packed_gemv_te(*placeholders[:1], w, *placeholders[1:], lanes)])
    renames = dict(zip(core.params, [x, w.words, w.scale, result], strict=True))
    core_root = _substitute_vars(core.body.block, renames)
    root = func.body.block
    dequantized = kernel.get(match.producers[0]).writes[0].source
    nests = list(root.body.seq)
    # the root's loop nests follow its blocks' order: [producer, matmul, epilogue...]
    epilogue = nests[len(match.producers) + 1 :]
    allocs = [b for b in root.alloc_buffers if not b.same_as(dequantized)]
    body = tirx.SeqStmt([*core_root.body.seq, *epilogue])
    block = s_tir.stmt.SBlock([], [], [], "root", body,
                              alloc_buffers=[*allocs, *core_root.alloc_buffers])  # fmt: skip
    return func.with_body(s_tir.stmt.SBlockRealize([], True, block))


def _substitute_vars(node, renames: dict):
    return tvm_ffi.structural_map(node, (tirx.Var, lambda v: renames.get(v, v)))


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
        size = _elements(kernel, loops)
        outer = sch.fuse(*loops[:-1]) if len(loops) > 1 else None
        _vectorize_inner(kernel, block)
        if outer is not None and size >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(outer)
    return True


# -- independent rows with opaque bodies (attention: one query row and head each) --------------
def _independent_rows(kernel: Kernel) -> bool:
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
    if body_work is None or _extent(kernel.sch, row) * body_work >= PARALLEL_MIN_ELEMENTS:
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


def _finish_rows(func: tirx.PrimFunc, kernel: Kernel) -> tirx.PrimFunc:
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
    return _substitute_vars(func, renames) if renames else func


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
        body = _substitute_vars(loop.body, {var: at})
        vector = tirx.For(inner, tirx.const(0, dtype), tirx.const(width, dtype),
                          tirx.ForKind.VECTORIZED, body)  # fmt: skip
        loops = [tirx.For(outer, tirx.const(0, dtype), tirx.const(whole, dtype),
                          tirx.ForKind.SERIAL, vector)]  # fmt: skip
        if rest:
            tail = tirx.Var(f"{var.name}_t", dtype)
            at = tirx.const(whole * width, dtype) + tail
            body = _substitute_vars(loop.body, {var: at})
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
        if not st.indices or not _plus_var(st.indices[-1], var):
            return False
        if any(_uses(i, var) for i in st.indices[:-1]):
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


def _plus_var(expr, var: tirx.Var) -> bool:
    """Whether `expr` is `var` plus terms free of it (so it moves one to one with `var`)."""
    if expr.same_as(var):
        return True
    if isinstance(expr, tirx.Add):
        if not _uses(expr.a, var):
            return _plus_var(expr.b, var)
        if not _uses(expr.b, var):
            return _plus_var(expr.a, var)
    return False


def _uses(expr, var: tirx.Var) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, (tirx.Var, lambda v: found.append(v.same_as(var))))
    return any(found)


# -- fast exp: a polynomial that vectorizes (LLVM calls expf once per lane) -------------------
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)  # fmt: skip


def fast_exp(x):
    """exp(x) in float32 within 2 ulp (Cephes expf): 2^n * p(r) with x = n ln2 + r."""
    f32 = "float32"
    x = tirx.max(tirx.min(x, tirx.const(88.37626, f32)), tirx.const(-87.33654, f32))
    n = tirx.floor(x * tirx.const(1.4426950408889634, f32) + tirx.const(0.5, f32))
    # ln 2 in two parts, so that n * ln2 is exact in the first
    r = x - n * tirx.const(0.693359375, f32) - n * tirx.const(-2.12194440e-4, f32)
    poly = tirx.const(_EXP_POLY[0], f32)
    for c in _EXP_POLY[1:]:
        poly = poly * r + tirx.const(c, f32)
    y = poly * r * r + r + tirx.const(1.0, f32)
    bits = (n.astype("int32") + tirx.const(127, "int32")) << tirx.const(23, "int32")
    return y * tirx.reinterpret(f32, bits)


def _fast_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """float32 exp and sigmoid as `fast_exp` polynomials."""

    def visit(call):
        op = getattr(call.op, "name", None)
        dtype = str(getattr(call.ty, "dtype", ""))
        if op not in ("tirx.exp", "tirx.sigmoid") or dtype != "float32":
            return call
        (x,) = call.args
        if op == "tirx.exp":
            return fast_exp(x)
        return tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") + fast_exp(-x))

    return tvm_ffi.structural_map(func, (tvm.ir.expr.Call, visit))


RULES: list[Rule] = [
    Rule("packed_gemv", _packed_gemv, _prefetch_rows),
    Rule("gemv", _gemv),
    Rule("gemm", _gemm),
    Rule("row_reduction", _row_reduction),
    Rule("elementwise", _elementwise),
    Rule("independent_rows", _independent_rows, _finish_rows),
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
            scheduled = kernel.sch.mod["main"]  # a rule may have rebuilt the kernel
            if rule.finish is not None:
                scheduled = rule.finish(scheduled, kernel)
            return _fast_math(scheduled).with_attr(ATTR, rule.name)
    return _fast_math(func)


def schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule each PrimFunc of `mod` for the llvm `target`; others are left unchanged."""
    funcs = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            func = schedule_func(func, target)
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)
