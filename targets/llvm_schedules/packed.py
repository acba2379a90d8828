"""The packed GEMV: one output row of a matmul whose weight a quantized format unpacks from
words (tapml's 4-bit groups, and GGUF's blocks kept as stored).

The kernel's dequantization block is recognized as a weight format's formula (rebuilt from
the format and the block's buffers, and compared structurally), and the matmul is rebuilt
around the format's `Affine` parts: w = q * scale[g] + bias[g] (or (q - offset) * scale[g]),
with q an unsigned field of the `low` words (and of the `high` words above it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import tvm_ffi
from tvm import s_tir, te, tirx
from tvm.s_tir.schedule import SBlockRV

from tapml.formats import Affine, WeightFormat

from .base import (
    FIELD_CHAINS,
    PARALLEL_MIN_ELEMENTS,
    PREFETCH_BYTES,
    Kernel,
    elements,
    extent,
    inline_chain,
    substitute_vars,
    vectorize_inner,
)
from .matmul import Matmul, match_matmul, x_read

F32, I32, U32 = "float32", "int32", "uint32"


@dataclass
class PackedWeight:
    """A dequantization block's weight format and the kernel buffers of its planes."""

    fmt: WeightFormat
    planes: dict[str, tirx.Buffer]

    def affine(self, planes: dict[str, Any] | None = None) -> Affine:
        """The format's formula over `planes` (TE tensors), or over the kernel's buffers."""
        return self.fmt.affine(planes if planes is not None else self.planes)


def packed_weight(kernel: Kernel, block: SBlockRV) -> PackedWeight | None:
    """The quantized weight a dequantization block reads, if its formula is exactly one
    format's (rebuilt over the block's buffers and compared structurally, both simplified:
    lowering has folded some of the block's index arithmetic)."""
    from tvm.sym.analyzer import Analyzer

    from tapml.quantization import FORMATS

    stmt = kernel.get(block)
    if not kernel.is_simple(block) or len(stmt.iter_vars) != 2:
        return None
    n, k = (v.var for v in stmt.iter_vars)
    simplify = Analyzer().simplify
    value = simplify(stmt.body.value)
    shape = tuple(int(d) for d in stmt.writes[0].source.shape)
    sources = [r.source for r in stmt.reads]
    for fmt in FORMATS.values():
        try:
            planes = fmt.planes(shape)
        except Exception:  # noqa: BLE001 - a format that cannot hold this shape
            continue
        if not fmt.quantized or len(planes) != len(sources):
            continue
        for order in itertools.permutations(sources):
            bound = dict(zip(planes, order, strict=True))
            if any((tuple(int(d) for d in b.shape), str(b.dtype)) != tuple(planes[p])
                   for p, b in bound.items()):  # fmt: skip
                continue
            try:
                expected = PackedWeight(fmt, bound).affine().weight(n, k)
            except NotImplementedError:  # not an affine format
                break
            if tvm_ffi.structural_equal(simplify(expected), value):
                return PackedWeight(fmt, bound)
    return None


def _packed_gemv_te(x: te.Tensor, w: Affine, lanes: int, n_rows: int) -> te.Tensor:
    """x [1, K] @ w^T -> [1, N] float32, arranged for vector registers.

    A vector holds `lanes` consecutive low words; each of a word's per_word fields is one step
    (a uniform shift), against x permuted once per call (x_words) so that its loads are
    contiguous. A field q (low and high bits, B in all) becomes the float 1 + q/L (L = 2**B)
    by an or of its bits into the top of 1.0's mantissa: no int-to-float conversion, which
    would double the work of the FMA ports (measured: 15% off a q4 GEMV on one thread). With
    x scaled by L (exactly), sum_f Lx*(1 + q/L) = sum_f x*q + L*sum_f x. The group's scale
    and bias leave the inner loop: sum_f x*(q*s + b) = s*(sum_f Lx*(1 + q/L) - sum_f Lx) +
    b*sum_f x, and for an offset instead of a bias, sum_f x*(q - offset)*s =
    s*(sum_f Lx*(1 + q/L) - sum_f Lx*(1 + offset/L)); the sums of x once per call. Biases
    are summed per group (b times the group's sum of x, in `bias_sum`), not per word, in the
    whole vectors (measured: a Q4_1 GEMV with its weights in cache 7% faster). A word's
    fields are summed in FIELD_CHAINS interleaved chains, so that an FMA need not wait for
    the one before (measured: 3-5% off the q4 GEMVs on one thread with their weights in
    cache; 4 chains gain less than 2). Whole vectors of words, then a tail of fewer words;
    the lanes are summed as a tree.
    """
    pw = 32 // w.low_bits
    n_words = int(w.low.shape[1])
    whole, tail = divmod(n_words, lanes)
    per_group = w.group // pw  # words per scale
    bits = w.low_bits + w.high_bits
    levels = 1 << bits

    def xf(k):
        return x[0, k].astype(F32) * tirx.const(levels, F32)

    def with_high(q, n, base, i, f):
        """q with field f's high bits of low word base + i or'ed in at 23 - high_bits."""
        block = 32 // w.high_bits  # low words per block of high words
        word = w.high[n, base // block * pw + f]
        top = 23 - w.high_bits
        if lanes >= 16 and w.high_bits == 1:
            # AVX-512: the vector's bits as a mask (vptestmd), an or where it is set
            lane = (tirx.const(1, U32) << _u32(i)) << _u32(base % block)
            return tirx.Select(word & lane != tirx.const(0, U32), q | tirx.const(1 << top, U32), q)
        if lanes >= 16:
            # AVX-512 rotates each lane by its own count (vprolvd): one instruction takes
            # the lane's bits to `top` (a funnel shift of the word with itself)
            word = tirx.reinterpret(I32, word)
            left = tirx.const(top, I32) - (base % block + i) * w.high_bits
            rotated = tirx.call_llvm_pure_intrin(I32, "llvm.fshl", word, word, left)
            mask = ((1 << w.high_bits) - 1) << top
            return q | (tirx.reinterpret(U32, rotated) & tirx.const(mask, U32))
        at = (base % block + i).astype(U32) * tirx.const(w.high_bits, U32)
        high = (word >> at) & tirx.const((1 << w.high_bits) - 1, U32)
        return q | (high << tirx.const(top, U32))

    def field(n, base, i, f):
        """Field f of low word base + i, as the float 1 + q/L. `base` is a multiple of the
        vector's width, which divides a block of high words (pack_high): the vector's f-th
        high bits are then in one word, at shifts stepping across the lanes."""
        shift = f.astype(U32) * tirx.const(w.low_bits, U32)
        q = (w.low[n, base + i] >> shift) & tirx.const((1 << w.low_bits) - 1, U32)
        q = q << tirx.const(23 - bits, U32)
        if w.high is not None:
            q = with_high(q, n, base, i, f)
        return tirx.reinterpret(F32, q | tirx.const(0x3F800000, U32))  # 1.0f

    offset = tirx.const(1 + w.offset / levels, F32)
    stages = _Stages(w, offset)
    acc = None
    if whole:
        xw = te.compute((whole, pw, lanes), lambda o, f, i: xf((o * lanes + i) * pw + f),
                        name="x_words")  # fmt: skip
        xo = stages.x_sums(lambda o, f, i: xw[o, f, i], (whole, lanes), pw, "x")
        chains = FIELD_CHAINS if pw % FIELD_CHAINS == 0 else 1
        per_chain = pw // chains
        f1 = te.reduce_axis((0, per_chain), name="f1")
        dot = te.compute(
            (n_rows, whole, chains, lanes),
            lambda n, o, c, i: te.sum(
                xw[o, c * per_chain + f1, i] * field(n, o * lanes, i, c * per_chain + f1),
                axis=f1,
            ),
            name="word_dot",
        )
        per_vector = lanes // per_group
        factors = stages.factors((n_rows, whole, per_vector),
                                 lambda o, g: o * per_vector + g, "word", bias=False)  # fmt: skip
        if w.bias is not None:
            bias = _bias_sum(x, w, whole, per_vector, n_rows)

        def vector_sum(n, i, o):
            fields = dot[n, o, 0, i]
            for c in range(1, chains):
                fields = fields + dot[n, o, c, i]
            return stages.combine(factors, (n, o, i // per_group), fields, (xo[0], None), (o, i))

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
            pieces[width] = _tail_piece(xf, field, stages, j0, width, pw, per_group, n_rows)
            j0 += width
    level = acc if whole else None
    width = lanes
    while width > 1:
        width //= 2
        level = _halve(level, pieces.get(width), width, n_rows)

    def row(n):
        if not whole or w.bias is None:
            return level[n, 0]
        return level[n, 0] + sum((bias[n, g] for g in range(1, per_vector)), bias[n, 0])

    return te.compute((1, n_rows), lambda _, n: row(n), name="gemv")


def _u32(value) -> tirx.PrimExpr:
    return tirx.const(value, U32) if isinstance(value, int) else value.astype(U32)


def _bias_sum(x: te.Tensor, w: Affine, whole: int, per_vector: int, n_rows: int) -> te.Tensor:
    """[N, per_vector]: per row, sum over the whole vectors of words of each group's bias
    times the group's sum of x (group g of vector o: per_vector groups a vector)."""
    r = te.reduce_axis((0, w.group), name="r")
    xg = te.compute((whole, per_vector), lambda o, g: te.sum(
        x[0, (o * per_vector + g) * w.group + r].astype(F32), axis=r), name="x_group")  # fmt: skip
    o = te.reduce_axis((0, whole), name="o")
    return te.compute((n_rows, per_vector), lambda n, g: te.sum(
        w.bias(n, o * per_vector + g) * xg[o, g], axis=o), name="bias_sum")  # fmt: skip


class _Stages:
    """The per-call sums of x and the per-row scales (and biases) a packed GEMV combines
    with each word's dot product (see `_packed_gemv_te`)."""

    def __init__(self, w: Affine, offset):
        self.w, self.offset = w, offset
        self.levels = 1 << (w.low_bits + w.high_bits)

    def x_sums(self, xs, shape: tuple[int, ...], fields: int, name: str):
        """(sum_f Lx*(1 + offset/L), sum_f x or None) per word of x, over its fields."""
        f0 = te.reduce_axis((0, fields), name="f0")
        offset = te.compute(shape, lambda *at: te.sum(xs(*at[:-1], f0, at[-1]) * self.offset,
                                                      axis=f0), name=f"{name}_offset")  # fmt: skip
        if self.w.bias is None:
            return offset, None
        f1 = te.reduce_axis((0, fields), name="f1")
        inverse = tirx.const(1.0 / self.levels, F32)  # L is a power of two: exact
        total = te.compute(shape, lambda *at: te.sum(xs(*at[:-1], f1, at[-1]) * inverse,
                                                     axis=f1), name=f"{name}_sum")  # fmt: skip
        return offset, total

    def factors(self, shape: tuple[int, ...], group, name: str, bias: bool = True):
        """Per row, the scale (and bias) of each group some words cover, staged: `group`
        maps an index over shape[1:] to the group's index in the row."""
        w = self.w
        scale = te.compute(shape, lambda n, *at: w.scale(n, group(*at)), name=f"{name}_scale")
        if w.bias is None or not bias:
            return scale, None
        bias = te.compute(shape, lambda n, *at: w.bias(n, group(*at)), name=f"{name}_bias")
        return scale, bias

    @staticmethod
    def combine(factors, at_group: tuple, fields, x_sums, at_word: tuple):
        """A word's contribution: scale * (its fields' dot - the offset sum) + bias * sum x."""
        (scale, bias), (offset, total) = factors, x_sums
        value = scale[at_group] * (fields - offset[at_word])
        return value if bias is None else value + bias[at_group] * total[at_word]


def _tail_piece(xf, field, stages: _Stages, j0: int, width: int, pw: int, per_group: int,
                n_rows: int):  # fmt: skip
    """(n, i) -> the scaled dot product of words j0 + i (i < width) of row n, as in the main
    part of `_packed_gemv_te` (factors staged per row, so that lanes sharing one are a
    shuffle, not a gather)."""
    xt = te.compute((pw, width), lambda f, i: xf((j0 + i) * pw + f), name=f"x_tail{width}")
    sums = stages.x_sums(lambda f, i: xt[f, i], (width,), pw, f"x_tail{width}")
    f1 = te.reduce_axis((0, pw), name="f1")
    dot = te.compute((n_rows, width),
                     lambda n, i: te.sum(xt[f1, i] * field(n, j0, i, f1), axis=f1),
                     name=f"tail_dot{width}")  # fmt: skip
    first, last = j0 // per_group, (j0 + width - 1) // per_group
    factors = stages.factors((n_rows, last - first + 1), lambda g: first + g, f"tail{width}")
    return lambda n, i: stages.combine(factors, (n, (j0 + i) // per_group - first), dot[n, i],
                                       sums, (i,))  # fmt: skip


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


def packed_gemv(kernel: Kernel) -> bool:
    """One output row of a matmul with a packed weight: the matmul is rebuilt as
    `_packed_gemv_te` (same result, float32 rounding aside) and its epilogue kept.

    Each task computes whole rows: a row's word vectors accumulate in registers, its words'
    fields are an unrolled sequence of shifts, and its lanes are summed at the end.
    """
    match = match_matmul(kernel)
    if match is None or match.rows != 1 or match.batch or len(match.producers) != 1:
        return False
    packed = packed_weight(kernel, match.producers[0])
    lanes = kernel.lanes()
    if packed is None or lanes < 2 or lanes & (lanes - 1):
        return False
    affine = packed.affine()
    pw = 32 // affine.low_bits
    per_group = affine.group // pw
    if affine.group % pw or lanes % per_group:
        return False
    if affine.high is not None and (32 // affine.high_bits) % lanes:
        return False  # a vector's high bits must lie in one block of high words (pack_high)
    if not kernel.one_nest_per_block():
        return False
    work = elements(kernel, kernel.sch.get_loops(match.reduction))
    epilogue_names = [kernel.get(b).name_hint for b in match.epilogue]
    func = _with_packed_gemv(kernel, match, packed, lanes)
    kernel.sch = sch = s_tir.Schedule(func)
    out = sch.get_sblock("gemv")
    _, n = sch.get_loops(out)
    names = {b: sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    row_stages = [b for b, name in names.items() if name.startswith(("lanes", "tail"))
                  or name in ("lane_sum", "bias_sum")]  # fmt: skip
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
            for stage in ("word_dot", "word_scale", "word_bias"):
                if stage not in names.values():
                    continue
                staged = sch.get_sblock(stage)
                sch.compute_at(staged, o if o is not None else n)
                sch.set_scope(staged, 0, "global")
                if stage != "word_dot" and lanes > per_group:  # else one factor per vector
                    sch.vectorize(sch.get_loops(staged)[-1])
            _chain_steps(sch, sch.get_sblock("word_dot"))
            sch.vectorize(i)
            if o is not None:
                sch.decompose_reduction(block, o)
        elif name == "bias_sum":
            _lane_steps(sch, block)
        elif name.startswith("tail_dot"):
            _field_steps(sch, block)
        elif own:
            sch.vectorize(own[-1])
    for block, name in names.items():  # x permuted and summed once per call
        if name.startswith("x_"):
            _lane_steps(sch, block)
    epilogue = [b for b, name in names.items() if name in epilogue_names]
    if epilogue:
        vectorize_inner(kernel, inline_chain(kernel, epilogue))
    kernel.row_streams = list(packed.planes.values())
    return True


def prefetch_rows(func: tirx.PrimFunc, kernel: Kernel) -> tirx.PrimFunc:
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
        if len(loops) >= 2 and extent(sch, lane) not in (None, 1):
            sch.reorder(fields, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(block, fields)
        return
    if extent(sch, loops[-1]) not in (None, 1):
        sch.vectorize(loops[-1])


def _field_steps(sch: s_tir.Schedule, block: SBlockRV) -> None:
    """A [lanes] x [fields] dot block: fields unrolled outside, lanes vectorized inside."""
    loops = sch.get_loops(block)
    fields = loops[-1]
    if len(loops) > 3 and extent(sch, loops[-2]) not in (None, 1):
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
    blocks, which write the matmul's result buffer."""
    reduction = kernel.get(match.reduction)
    x = reduction.reads[x_read(kernel, match.reduction)].source
    result = reduction.writes[0].source
    buffers = [x, *w.planes.values()]
    placeholders = [te.placeholder([int(d) for d in b.shape], b.dtype, name=b.name)
                    for b in buffers]  # fmt: skip
    affine = w.affine(dict(zip(w.planes, placeholders[1:], strict=True)))
    gemv = _packed_gemv_te(placeholders[0], affine, lanes, int(result.shape[1]))
    core = te.create_prim_func([*placeholders, gemv])
    renames = dict(zip(core.params, [*buffers, result], strict=True))
    core_root = substitute_vars(core.body.block, renames)
    return splice_matmul(kernel, match, list(core_root.body.seq), list(core_root.alloc_buffers))


def splice_matmul(kernel: Kernel, match: Matmul, core: list[tirx.Stmt],
                  allocs: list[tirx.Buffer]) -> tirx.PrimFunc:  # fmt: skip
    """The kernel with its dequantization and matmul blocks replaced by `core`, statements
    that write the matmul's result buffer (allocating `allocs`); the epilogue blocks stay as
    they are."""
    func = kernel.sch.mod["main"]
    root = func.body.block
    dequantized = kernel.get(match.producers[0]).writes[0].source
    nests = list(root.body.seq)
    # the root's loop nests follow its blocks' order: [producer, matmul, epilogue...]
    epilogue = nests[len(match.producers) + 1 :]
    kept = [b for b in root.alloc_buffers if not b.same_as(dequantized)]
    stmts = [*core, *epilogue]
    body = stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)
    block = s_tir.stmt.SBlock([], [], [], "root", body, alloc_buffers=[*kept, *allocs])
    return func.with_body(s_tir.stmt.SBlockRealize([], True, block))
