"""The int8 GEMV: a decode matmul (one row of x) with a packed weight, on CPUs with VNNI,
computed as `int8.py`'s GEMM computes prefill: x quantized to int8 per span of the weight's
groups, each span's dot products of unsigned weight fields and signed activations summed in
int32 by `vpdpbusd`, then scaled into float32.

The float GEMV (`packed.py`) spends about five instructions on every 16 values, so on two
threads it reads weights slower than memory delivers them. Here a vector holds 16 low words
of a weight row, one a lane, as the stored planes lay them out: a word's fields, masked (and
shifted), are the bytes `vpdpbusd` multiplies with the 4 values of x it pairs with, x having
been quantized once per call into that order (`int8._Layout`). A lane's int32 sum covers one
low word, inside one span; it is converted once, and multiplied by the lane's factor: its
group's scale (staged per row, one vector load and a shuffle) times its span's scale of x.
An offset (w = (q - offset) * scale) is paid once per call: each word's sum starts at
-offset * sum xq; a bias (w = q * scale + bias) is a dot product of the row's biases with
x's sums per group, vectorized over the groups.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tapml.formats import Affine

from .base import PARALLEL_MIN_ELEMENTS, Kernel, inline_chain, vectorize_inner
from .int8 import F32, I8, I32, U32, _Layout, _layout, _vpdpbusd, has_vnni
from .matmul import match_matmul, x_read
from .packed import packed_weight, splice_matmul

LANES = 16  # int32 lanes of one vpdpbusd: one low word of the weight row each


def int8_gemv(kernel: Kernel) -> bool:
    """One output row of a matmul with a packed weight, as `_Int8Gemv`, where the CPU has VNNI
    and the shapes fit (K whole vectors of 16 low words); its epilogue kept. Only where the
    build chose int8 decode (`targets.llvm.int8_matmuls`)."""
    if "decode" not in kernel.int8 or not has_vnni(kernel.target):
        return False
    match = match_matmul(kernel)
    if match is None or match.rows != 1 or match.batch or len(match.producers) != 1:
        return False
    packed = packed_weight(kernel, match.producers[0])
    if packed is None:
        return False
    reduction = kernel.get(match.reduction)
    x = reduction.reads[x_read(kernel, match.reduction)].source
    y = reduction.writes[0].source
    w = packed.affine()
    layout = _layout(w, int(x.shape[1]))
    if layout is None or (int(x.shape[1]) // layout.per_low) % LANES:
        return False
    if not kernel.one_nest_per_block():
        return False
    epilogue_names = [kernel.get(b).name_hint for b in match.epilogue]
    gemv = _Int8Gemv(x, w, y, layout)
    with IRBuilder() as quantize:
        gemv.quantize()
    parallel = int(y.shape[1]) * int(x.shape[1]) >= PARALLEL_MIN_ELEMENTS
    loop = T.parallel if parallel else T.serial
    with IRBuilder() as rows, loop(0, gemv.n_rows) as n:
        gemv.row(n)
    core = [quantize.get(), rows.get()]
    kernel.sch = sch = tvm.s_tir.Schedule(splice_matmul(kernel, match, core, gemv.buffers()))
    if epilogue_names:
        epilogue = [sch.get_sblock(name) for name in epilogue_names]
        vectorize_inner(kernel, inline_chain(kernel, epilogue))
    kernel.row_streams = list(packed.planes.values())
    return True


def _shuffle(vector, indices: list[int]):
    return tirx.Shuffle([vector], [tirx.const(i, I32) for i in indices])


def _lane_sum(vector, lanes: int):
    """The sum of a float32 vector's lanes (a power of two), as a tree of halves."""
    while lanes > 1:
        lanes //= 2
        low, high = list(range(lanes)), list(range(lanes, 2 * lanes))
        vector = _shuffle(vector, low) + _shuffle(vector, high)
    return vector


class _Int8Gemv:
    """The shapes and per-call buffers of one int8 GEMV, and the IR builder code of its two
    parts: x quantized (xq: word (h, j)'s 4 bytes at (h * low_words + j) * 4; xs: its span's
    scale per low word; xstart: -offset * the word's sum of xq, or xsum: the scaled sum of xq
    per group, for a bias), then the rows' dot products."""

    def __init__(self, x: tirx.Buffer, w: Affine, y: tirx.Buffer, layout: _Layout):
        self.x, self.w, self.y, self.layout = x, w, y, layout
        self.k = int(x.shape[1])
        self.n_rows = int(y.shape[1])
        self.low_words, self.spans = self.k // layout.per_low, self.k // layout.span
        self.steps = layout.span // layout.per_low  # low words per span
        self.per_group = w.group // layout.per_low  # low words per group
        self.groups = self.k // w.group
        self.bias = w.bias is not None
        self.xq = tirx.decl_buffer((self.k,), I8, "x_int8")
        self.xs = tirx.decl_buffer((self.low_words,), F32, "x_scale")
        self.xstart = tirx.decl_buffer((self.low_words,), I32, "x_start")
        self.xsum = tirx.decl_buffer((self.groups,), F32, "x_sum")
        self.top = tirx.decl_buffer((1,), F32, "x_top")
        self.total = tirx.decl_buffer((1,), I32, "x_total")

    def buffers(self) -> list[tirx.Buffer]:
        return [self.xq, self.xs, self.xsum if self.bias else self.xstart, self.top, self.total]

    def quantize(self) -> None:
        """x as int8 per span, round(x / d) with d = max |x| / 127, into xq, xs and xstart
        (or xsum)."""
        layout, x, span, top, total = self.layout, self.x, self.layout.span, self.top, self.total
        spans = self.w.group // span  # per group
        with T.serial(0, self.groups) as g:
            if self.bias:
                T.buffer_store(self.xsum, T.float32(0), [g])
            with T.serial(0, spans) as si:
                s = g * spans + si
                T.buffer_store(top, T.float32(0), [0])
                with T.serial(0, span) as i:
                    T.buffer_store(top, T.max(top[0], T.abs(x[0, s * span + i].astype(F32))), [0])
                d = top[0] / T.float32(127)
                inverse = T.Select(top[0] > T.float32(0), T.float32(127) / top[0], T.float32(0))
                with T.serial(0, self.steps) as step:
                    j = s * self.steps + step
                    T.buffer_store(total, T.int32(0), [0])
                    with T.serial(0, layout.words) as h, T.serial(0, 4) as b:
                        q = T.Cast(I32, T.nearbyint(x[0, layout.k(j, h, b)].astype(F32) * inverse))
                        T.buffer_store(self.xq, T.Cast(I8, q), [(h * self.low_words + j) * 4 + b])
                        T.buffer_store(total, total[0] + q, [0])
                    T.buffer_store(self.xs, d, [j])
                    if self.bias:
                        T.buffer_store(self.xsum, self.xsum[g] + d * T.Cast(F32, total[0]), [g])
                    else:
                        T.buffer_store(self.xstart, total[0] * T.int32(-self.w.offset), [j])

    def row(self, n) -> None:
        """y[0, n]: the row's group scales staged, then per vector of 16 low words, their
        int32 dot products with xq, scaled and summed in float32 lanes."""
        w, groups, per_group = self.w, self.groups, self.per_group
        scale = T.alloc_buffer((groups + LANES,), F32)  # a vector load may pass the end
        lanes = groups & -groups  # a power of two (a tree sums the biases' lanes)
        lanes = min(lanes, LANES)
        biased = T.alloc_buffer((groups,), F32) if self.bias else None
        with T.serial(0, groups // lanes) as go, T.vectorized(0, lanes) as gi:
            g = go * lanes + gi
            T.buffer_store(scale, w.scale(n, g), [g])
            if biased is not None:
                T.buffer_store(biased, w.bias(n, g) * self.xsum[g], [g])
        acc = T.alloc_buffer((LANES,), F32)
        T.buffer_store(acc, T.broadcast(T.float32(0), LANES), [T.ramp(0, 1, LANES)])
        with T.serial(0, self.low_words // LANES) as v:
            j = v * LANES
            dot = T.broadcast(T.int32(0), LANES) if self.bias else \
                self.xstart.vload([j], f"{I32}x{LANES}")  # fmt: skip
            for h in range(self.layout.words):
                dot = _vpdpbusd(dot, self.weight_words(n, v, h),
                                self.xq.vload([(h * self.low_words + j) * 4], f"{I8}x64"))
            group_scales = _shuffle(scale.vload([j // per_group], f"{F32}x{LANES}"),
                                    [i // per_group for i in range(LANES)])  # fmt: skip
            factor = group_scales * self.xs.vload([j], f"{F32}x{LANES}")
            T.buffer_store(acc, T.fma(T.Cast(f"{F32}x{LANES}", dot), factor,
                                      acc.vload([0], f"{F32}x{LANES}")), [T.ramp(0, 1, LANES)])
        total = _lane_sum(acc.vload([0], f"{F32}x{LANES}"), LANES)
        if biased is not None:  # sum_g bias * x's sum, in vectors of the groups
            bias = T.alloc_buffer((lanes,), F32)
            T.buffer_store(bias, biased.vload([0], f"{F32}x{lanes}"), [T.ramp(0, 1, lanes)])
            with T.serial(1, groups // lanes) as go:
                T.buffer_store(bias, bias.vload([0], f"{F32}x{lanes}")
                               + biased.vload([go * lanes], f"{F32}x{lanes}"),
                               [T.ramp(0, 1, lanes)])  # fmt: skip
            total = total + _lane_sum(bias.vload([0], f"{F32}x{lanes}"), lanes)
        T.buffer_store(self.y, total.astype(self.y.dtype), [0, n])

    def weight_words(self, n, v, h):
        """Words (h, 16v .. 16v + 15) of row n: fields h, h + H, h + 2H, h + 3H of each low
        word as its 4 bytes, high bits above the low ones. A vector's high bits of one field
        lie in one word (`_layout`), lane i's at bit (16v % per_word + i) * high_bits: each
        lane rotates its bits into place (vprolvd), and an and-or puts them in the byte."""
        w, layout = self.w, self.layout
        word = w.low.vload([n, v * LANES], f"{U32}x{LANES}")
        if h:
            word = word >> T.broadcast(tirx.const(h * w.low_bits, U32), LANES)
        if w.low_bits < 8:
            word = word & T.broadcast(tirx.const(0x01010101 * ((1 << w.low_bits) - 1), U32),
                                      LANES)  # fmt: skip
        if w.high is not None:
            per_word = 32 // w.high_bits  # low words per high word
            at = tirx.Ramp(T.Cast(I32, v * LANES % per_word), 1, LANES)
            for b in range(4):
                top = 8 * b + w.low_bits
                high = w.high[n, v * LANES // per_word * layout.per_low + layout.k(0, h, b)]
                high = T.broadcast(T.reinterpret(I32, high), LANES)
                left = T.broadcast(T.int32(top), LANES) - at * T.broadcast(T.int32(w.high_bits),
                                                                            LANES)  # fmt: skip
                rotated = T.call_llvm_pure_intrin(f"{I32}x{LANES}", "llvm.fshl", high, high, left)
                mask = ((1 << w.high_bits) - 1) << top
                word = word | (T.reinterpret(f"{U32}x{LANES}", rotated)
                               & T.broadcast(tirx.const(mask, U32), LANES))  # fmt: skip
        return T.reinterpret(f"{I32}x{LANES}", word)
