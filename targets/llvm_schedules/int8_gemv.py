"""The int8 GEMV: a decode matmul (one row of x) with a packed weight, on CPUs with VNNI,
computed as `int8.py`'s GEMM computes prefill: x quantized to int8 per span of the weight's
groups, each span's dot products of unsigned weight fields and signed activations summed in
int32 by `vpdpbusd`, then scaled into float32.

The float GEMV (`packed.py`) spends about five instructions on every 16 values, so on two
threads it reads weights slower than memory delivers them. Here a vector holds 16 low words
of a weight row, one a lane, as the stored planes lay them out: a word's fields, masked (and
shifted, high bits or'ed in), are the bytes `vpdpbusd` multiplies with the 4 values of x
they pair with, x having been quantized once per call into that order (`int8.Layout`). A
lane's int32 sum covers one low word, inside one span; it is converted once and multiplied
by the lane's factor: its group's scale (staged a chunk of groups at a time, then one vector
load and a shuffle) times its span's scale of x. An offset (w = (q - offset) * scale) is
paid once per call: each word's sum starts at -offset * sum xq; a bias (w = q * scale +
bias) is a dot product of the row's biases with x's sums per group, in vectors of groups.
Measured on two threads, weights streaming (Qwen2.5's shapes): Q5_0 1.3x, Q4_K 1.35x, Q6_K
1.5x the float GEMV's speed.
"""

from __future__ import annotations

import operator

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tapml.formats import Affine

from .base import PARALLEL_MIN_ELEMENTS, Kernel, divisor
from .int8 import F32, I8, I32, U32, Layout, int8_matmul, vpdpbusd

LANES = 16  # int32 lanes of one vpdpbusd: one low word of the weight row each
# At most this many of a row's group scales are staged at a time: a task's buffers over 1 KiB
# are allocated from TVM's workspace, two calls a row (measured: a fifth of a Q6_K GEMV)
STAGED = 128


def _chunk(groups: int, per_group: int) -> int | None:
    """Groups staged at a time: at most STAGED, whole vectors of low words."""
    return next((c for c in range(min(groups, STAGED), 0, -1)
                 if groups % c == 0 and c * per_group % LANES == 0), None)  # fmt: skip


def int8_gemv(kernel: Kernel) -> bool:
    """One output row of a matmul with a packed weight, as `_Int8Gemv`, where the shapes fit
    (`int8_matmul`, and K in chunks of whole groups and whole vectors of 16 low words); its
    epilogue kept."""
    m = int8_matmul(kernel, "decode", lambda rows: rows == 1)
    if m is None:
        return False
    gemv = _Int8Gemv(m.x, m.w, m.y, m.layout)
    if gemv.chunk is None:
        return False
    with IRBuilder() as quantize:
        gemv.quantize()
    core = [quantize.get()]
    if not gemv.bias:
        with IRBuilder() as offsets:
            gemv.word_offsets()
        core.append(offsets.get())
    loop = T.parallel if gemv.n_rows * gemv.k >= PARALLEL_MIN_ELEMENTS else T.serial
    with IRBuilder() as rows, loop(0, gemv.n_rows) as n:
        gemv.row(n)
    core.append(rows.get())
    m.splice(kernel, core, gemv.buffers())
    kernel.row_streams = list(m.packed.planes.values())
    return True


def _shuffle(vector, indices: list[int]):
    """The vector's lanes at `indices` (as many lanes as it has, at most)."""
    return tirx.Shuffle([vector], [tirx.const(i, I32) for i in indices])


def _reduce_lanes(vector, lanes: int, combine=operator.add):
    """A vector's lanes (a power of two of them) combined, as a tree of halves."""
    while lanes > 1:
        lanes //= 2
        low, high = list(range(lanes)), list(range(lanes, 2 * lanes))
        vector = combine(_shuffle(vector, low), _shuffle(vector, high))
    return vector


class _Int8Gemv:
    """The shapes and per-call buffers of one int8 GEMV, and the IR builder code of its two
    parts: x quantized (xq: word (h, j)'s 4 bytes at (h * low_words + j) * 4; xs: its span's
    scale per low word; xstart: -offset * the word's sum of xq, or xsum: the scaled sum of xq
    per group, for a bias), then the rows' dot products."""

    def __init__(self, x: tirx.Buffer, w: Affine, y: tirx.Buffer, layout: Layout):
        self.x, self.w, self.y, self.layout = x, w, y, layout
        self.k = int(x.shape[1])
        self.n_rows = int(y.shape[1])
        self.low_words = self.k // layout.per_low
        self.steps = layout.span // layout.per_low  # low words per span
        self.per_group = w.group // layout.per_low  # low words per group
        self.groups = self.k // w.group
        self.chunk = _chunk(self.groups, self.per_group)
        self.bias = w.bias is not None
        self.xq = tirx.decl_buffer((self.k,), I8, "x_int8")
        self.xs = tirx.decl_buffer((self.low_words,), F32, "x_scale")
        self.xstart = tirx.decl_buffer((self.low_words,), I32, "x_start")
        self.xsum = tirx.decl_buffer((self.groups,), F32, "x_sum")

    def buffers(self) -> list[tirx.Buffer]:
        return [self.xq, self.xs, self.xsum if self.bias else self.xstart]

    def quantize(self) -> None:
        """x as int8 per span, round(x * 127 / top) with top = max |x| and d = top / 127,
        a span a few vector instructions: xq in the words' byte order, d per low word (xs),
        and for a bias, each group's d * sum xq (xsum)."""
        layout, span, words, steps = self.layout, self.layout.span, self.layout.words, self.steps
        spans = self.w.group // span  # per group
        with T.serial(0, self.groups) as g:
            if self.bias:
                T.buffer_store(self.xsum, T.float32(0), [g])
            with T.serial(0, spans) as si:
                s = g * spans + si
                xv = self.x.vload([0, s * span], f"{self.x.dtype}x{span}").astype(f"{F32}x{span}")
                top = _reduce_lanes(T.abs(xv), span, T.max)
                inverse = T.Select(top > T.float32(0), T.float32(127) / top, T.float32(0))
                q = T.Cast(f"{I32}x{span}", T.nearbyint(xv * T.broadcast(inverse, span)))
                q8 = T.Cast(f"{I8}x{span}", q)
                for h in range(words):  # fields h, h + words, ... of each low word
                    fields = [t for t in range(span) if t % layout.per_low % words == h]
                    at = (h * self.low_words + s * steps) * 4
                    T.buffer_store(self.xq, _shuffle(q8, fields), [T.ramp(at, 1, span // words)])
                d = top / T.float32(127)
                T.buffer_store(self.xs, T.broadcast(d, steps), [T.ramp(s * steps, 1, steps)])
                if self.bias:
                    total = T.Cast(F32, _reduce_lanes(q, span))
                    T.buffer_store(self.xsum, self.xsum[g] + d * total, [g])

    def word_offsets(self) -> None:
        """Each low word's -offset * sum xq (xstart), 16 words a vpdpbusd per field word."""
        offset = self.w.offset * 0x01010101  # the offset in each byte
        offset = tirx.const(offset - (1 << 32) if offset >= 1 << 31 else offset, I32)
        with T.serial(0, self.low_words // LANES) as v:
            start = T.broadcast(T.int32(0), LANES)
            for h in range(self.layout.words):
                x_bytes = self.xq.vload([(h * self.low_words + v * LANES) * 4], f"{I8}x64")
                start = vpdpbusd(start, T.broadcast(offset, LANES), x_bytes)
            T.buffer_store(self.xstart, T.broadcast(T.int32(0), LANES) - start,
                           [T.ramp(v * LANES, 1, LANES)])  # fmt: skip

    def row(self, n) -> None:
        """y[0, n]: per chunk of the row's groups, their scales staged (and biases times x's
        sums), then per vector of 16 low words, their int32 dot products with xq, scaled and
        summed in float32 lanes."""
        w, per_group, chunk = self.w, self.per_group, self.chunk
        scale = T.alloc_buffer((chunk + LANES,), F32)  # a vector load may pass the end
        biased = T.alloc_buffer((chunk,), F32) if self.bias else None
        bias_lanes = min(chunk & -chunk, LANES)  # a power of two (a tree sums the lanes)
        acc = T.alloc_buffer((LANES,), F32)
        T.buffer_store(acc, T.broadcast(T.float32(0), LANES), [T.ramp(0, 1, LANES)])
        if biased is not None:
            bias = T.alloc_buffer((bias_lanes,), F32)
            T.buffer_store(bias, T.broadcast(T.float32(0), bias_lanes),
                           [T.ramp(0, 1, bias_lanes)])  # fmt: skip
        unrolled = divisor(chunk, LANES)
        with T.serial(0, self.groups // chunk) as c:
            # unrolled, not vectorized: a vector of groups gathers the scale planes' words
            # lane by lane, while LLVM turns the unrolled scalar code into vector code
            with T.serial(0, chunk // unrolled) as go, T.unroll(0, unrolled) as gi:
                g = go * unrolled + gi
                T.buffer_store(scale, w.scale(n, c * chunk + g), [g])
                if biased is not None:
                    T.buffer_store(biased, w.bias(n, c * chunk + g) * self.xsum[c * chunk + g],
                                   [g])  # fmt: skip
            with T.serial(0, chunk * per_group // LANES) as v:
                j = c * chunk * per_group + v * LANES
                dot = T.broadcast(T.int32(0), LANES) if self.bias else \
                    self.xstart.vload([j], f"{I32}x{LANES}")  # fmt: skip
                for h in range(self.layout.words):
                    dot = vpdpbusd(dot, self.weight_words(n, j, h),
                                    self.xq.vload([(h * self.low_words + j) * 4], f"{I8}x64"))
                group_scales = _shuffle(scale.vload([v * LANES // per_group], f"{F32}x{LANES}"),
                                        [i // per_group for i in range(LANES)])  # fmt: skip
                factor = group_scales * self.xs.vload([j], f"{F32}x{LANES}")
                T.buffer_store(acc, T.fma(T.Cast(f"{F32}x{LANES}", dot), factor,
                                          acc.vload([0], f"{F32}x{LANES}")),
                               [T.ramp(0, 1, LANES)])  # fmt: skip
            if biased is not None:  # sum_g bias * x's sum, in vectors of the groups
                with T.serial(0, chunk // bias_lanes) as go:
                    T.buffer_store(bias, bias.vload([0], f"{F32}x{bias_lanes}")
                                   + biased.vload([go * bias_lanes], f"{F32}x{bias_lanes}"),
                                   [T.ramp(0, 1, bias_lanes)])  # fmt: skip
        total = _reduce_lanes(acc.vload([0], f"{F32}x{LANES}"), LANES)
        if biased is not None:
            total = total + _reduce_lanes(bias.vload([0], f"{F32}x{bias_lanes}"), bias_lanes)
        T.buffer_store(self.y, total.astype(self.y.dtype), [0, n])

    def weight_words(self, n, j, h):
        """Words (h, j .. j + 15) of row n (j a multiple of 16): fields h, h + H, h + 2H,
        h + 3H of each low word as its 4 bytes, high bits above the low ones. A vector's high
        bits of one field lie in one word (`byte_layout`), lane i's at bit (j % per_word + i) *
        high_bits: each lane rotates its bits into place (vprolvd), and an and-or puts them
        in the byte."""
        w, layout = self.w, self.layout
        word = w.low.vload([n, j], f"{U32}x{LANES}")
        if h:
            word = word >> T.broadcast(tirx.const(h * w.low_bits, U32), LANES)
        if w.low_bits < 8:
            word = word & T.broadcast(tirx.const(0x01010101 * ((1 << w.low_bits) - 1), U32),
                                      LANES)  # fmt: skip
        if w.high is not None:
            per_word = 32 // w.high_bits  # low words per high word
            at = tirx.Ramp(T.Cast(I32, j % per_word), 1, LANES)
            for b in range(4):
                top = 8 * b + w.low_bits
                high = w.high[n, j // per_word * layout.per_low + layout.k(0, h, b)]
                high = T.broadcast(T.reinterpret(I32, high), LANES)
                left = T.broadcast(T.int32(top), LANES) - at * T.broadcast(T.int32(w.high_bits),
                                                                            LANES)  # fmt: skip
                rotated = T.call_llvm_pure_intrin(f"{I32}x{LANES}", "llvm.fshl", high, high, left)
                mask = ((1 << w.high_bits) - 1) << top
                word = word | (T.reinterpret(f"{U32}x{LANES}", rotated)
                               & T.broadcast(tirx.const(mask, U32), LANES))  # fmt: skip
        return T.reinterpret(f"{I32}x{LANES}", word)
