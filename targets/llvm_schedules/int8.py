"""The int8 GEMM: a prefill matmul with a packed weight, on CPUs with VNNI (AVX-512), computed
as llama.cpp computes it: activations quantized to int8 per span of the weight's groups, and
each span's dot product of unsigned weight fields and signed activations summed in int32 by
`vpdpbusd` (64 byte products an instruction, four times the float FMAs' rate).

x[m, k] ~ d[m, s] * xq[m, k] (xq = round(x / d), d = max |x| / 127 over span s), so that
sum_k x * w over a span (w = (q - offset) * scale, or q * scale + bias) is
scale * d * (sum_k q * xq - offset * sum_k xq), or scale * d * sum_k q * xq +
bias * d * sum_k xq: one int32 dot product per span, then float.

Each 32-bit word of a span holds 4 weight fields as bytes, each a 16-row vector of x holds the
same 4 values of k per row (64 bytes), so one instruction does 16 rows x 4 values. The words
are unpacked from the stored planes a few columns at a time (vectorized along the row's low
words): a 4-bit low word's fields 0, 2, 4, 6 and 1, 3, 5, 7 are its bytes after a mask and
after a shift and the mask, with any high bits or'ed above them; x is quantized once per call
into the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tapml.formats import Affine, high_field

from .base import Kernel, divisor, inline_chain, vectorize_inner
from .matmul import Matmul, match_matmul, x_read
from .packed import PackedWeight, packed_weight, splice_matmul

VNNI = "avx512vnni"
ROWS = 16  # rows of x in one vector of int32 sums
COLUMNS = 4  # output columns a task's int32 sums stay in registers for
ROW_VECTORS = 2  # row vectors sharing each weight word
SPAN = 32  # at most this many values of k share one scale of x
I8, I32, F32, U32 = "int8", "int32", "float32", "uint32"


@dataclass(frozen=True)
class Layout:
    """Where value k of a row sits among the 4-byte words of the dot products: word (h, j)
    holds fields h, h + H, h + 2H, h + 3H of low word j (H = fields per low word / 4), one a
    byte; spans of `span` values (whole low words, within one weight group) share x's scale."""

    per_low: int  # fields per low word
    span: int

    @property
    def words(self) -> int:  # byte words per low word
        return self.per_low // 4

    def k(self, j, h, b):
        return j * self.per_low + h + b * self.words


def byte_layout(w: Affine, k: int) -> Layout | None:
    per_low = 32 // w.low_bits
    span = min(w.group, SPAN)
    if w.low_bits not in (4, 8) or w.low_bits + w.high_bits > 8:
        return None
    if w.group % span or span % per_low or k % span:
        return None
    if w.high is not None and (32 // w.high_bits) % ROWS:
        return None  # a vector of low words must find its high bits in one word
    return Layout(per_low, span)


def has_vnni(target: tvm.target.Target) -> bool:
    return bool(tvm.target.codegen.target_has_features(VNNI, target))


@dataclass(frozen=True)
class Int8Matmul:
    """A matmul over a packed weight that an int8 rule computes: x [M, K] @ w^T -> y [M, N]."""

    match: Matmul
    packed: PackedWeight
    x: tirx.Buffer
    y: tirx.Buffer
    w: Affine
    layout: Layout

    def splice(self, kernel: Kernel, core: list[tirx.Stmt], allocs: list[tirx.Buffer]) -> None:
        """The kernel rebuilt with `core` in place of the dequantization and the matmul, its
        epilogue vectorized."""
        names = [kernel.get(b).name_hint for b in self.match.epilogue]
        kernel.sch = sch = tvm.s_tir.Schedule(splice_matmul(kernel, self.match, core, allocs))
        if names:
            vectorize_inner(kernel, inline_chain(kernel, [sch.get_sblock(n) for n in names]))


def int8_matmul(kernel: Kernel, stage: str, rows_fit: Callable[[int], bool]) -> Int8Matmul | None:
    """The kernel's matmul over a packed weight, if the build chose int8 for `stage`
    (`targets.llvm.int8_matmuls`), the CPU has VNNI, and its rows and weight fit."""
    if stage not in kernel.int8 or not has_vnni(kernel.target):
        return None
    match = match_matmul(kernel)
    if match is None or not rows_fit(match.rows) or match.batch or len(match.producers) != 1:
        return None
    packed = packed_weight(kernel, match.producers[0])
    if packed is None or not kernel.one_nest_per_block():
        return None
    reduction = kernel.get(match.reduction)
    x = reduction.reads[x_read(kernel, match.reduction)].source
    w = packed.affine()
    layout = byte_layout(w, int(x.shape[1]))
    if layout is None:
        return None
    return Int8Matmul(match, packed, x, reduction.writes[0].source, w, layout)


def int8_gemm(kernel: Kernel) -> bool:
    """A matmul of many rows with a packed weight, as `_int8_gemm_stmts`, where the shapes fit
    (rows a multiple of 16, K whole spans; `int8_matmul`); its epilogue kept."""
    m = int8_matmul(kernel, "prefill", lambda rows: rows % ROWS == 0)
    if m is None:
        return False
    m.splice(kernel, *_int8_gemm_stmts(m.x, m.w, m.y, m.layout))
    return True


def vpdpbusd(acc, words, x_bytes):
    """acc (int32x16) + per lane, the sum of 4 products of the unsigned bytes of `words` and
    the signed bytes of `x_bytes` (int8x64)."""
    return T.call_llvm_pure_intrin(f"{I32}x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                   T.reinterpret(f"{I8}x64", words), x_bytes)  # fmt: skip


def _int8_gemm_stmts(x: tirx.Buffer, w: Affine, y: tirx.Buffer, layout: Layout
                     ) -> tuple[list[tirx.Stmt], list[tirx.Buffer]]:  # fmt: skip
    """y = x @ w^T: x quantized (a loop over its rows), then the int8 dot products (a loop
    over tasks of a few output columns); and the buffers they share."""
    gemm = _Int8Gemm(x, w, y, layout)
    with IRBuilder() as quantize, T.parallel(0, gemm.m_rows) as m:
        gemm.quantize_row(m)
    with IRBuilder() as products, T.parallel(0, gemm.n_cols // gemm.columns) as task:
        gemm.task(task)
    return [quantize.get(), products.get()], [gemm.xq, gemm.xs, gemm.xsum]


class _Int8Gemm:
    """The shapes and per-call buffers of one int8 GEMM, and the IR builder code of its parts:
    x's int8 bytes (xq: per row vector, word (h, j) of every row in 64 bytes), x's scale per
    span and row (xs), and the sum of a span's int8 values per row (xsum: times the weight's
    offset, or times the scale where the weight has a bias instead)."""

    def __init__(self, x: tirx.Buffer, w: Affine, y: tirx.Buffer, layout: Layout):
        self.x, self.w, self.y, self.layout = x, w, y, layout
        self.m_rows, self.k = (int(d) for d in x.shape)
        self.n_cols = int(y.shape[1])
        self.low_words, self.spans = self.k // layout.per_low, self.k // layout.span
        self.steps = layout.span // layout.per_low  # low words per span
        self.groups = self.k // w.group
        self.row_vectors = divisor(self.m_rows // ROWS, ROW_VECTORS)
        self.columns = divisor(self.n_cols, COLUMNS)
        self.bias = w.bias is not None
        self.xq = tirx.decl_buffer((self.m_rows * self.k,), I8, "x_int8")
        self.xs = tirx.decl_buffer((self.spans * self.m_rows,), F32, "x_scale")
        self.xsum = tirx.decl_buffer((self.spans * self.m_rows,), F32 if self.bias else I32,
                                     "x_sum")  # fmt: skip

    def x_at(self, v, h, j):
        """Where the 64 bytes of row vector v for word (h, j) start in xq."""
        return ((v * self.layout.words + h) * self.low_words + j) * ROWS * 4

    def quantize_row(self, m) -> None:
        """Row m of x as int8 per span, round(x / d) with d = max |x| / 127, into xq, xs and
        xsum."""
        layout, x, span = self.layout, self.x, self.layout.span
        top = T.alloc_buffer((1,), F32)
        total = T.alloc_buffer((1,), I32)
        with T.serial(0, self.spans) as s:
            T.buffer_store(top, T.float32(0), [0])
            with T.serial(0, span) as i:
                T.buffer_store(top, T.max(top[0], T.abs(x[m, s * span + i].astype(F32))), [0])
            d = top[0] / T.float32(127)
            inverse = T.Select(top[0] > T.float32(0), T.float32(127) / top[0], T.float32(0))
            T.buffer_store(total, T.int32(0), [0])
            with T.serial(0, self.steps) as step, T.serial(0, layout.words) as h, \
                    T.serial(0, 4) as b:  # fmt: skip
                j = s * self.steps + step
                q = T.Cast(I32, T.nearbyint(x[m, layout.k(j, h, b)].astype(F32) * inverse))
                T.buffer_store(self.xq, T.Cast(I8, q),
                               [self.x_at(m // ROWS, h, j) + m % ROWS * 4 + b])  # fmt: skip
                T.buffer_store(total, total[0] + q, [0])
            at = s * self.m_rows + m
            T.buffer_store(self.xs, d, [at])
            if self.bias:
                T.buffer_store(self.xsum, d * T.Cast(F32, total[0]), [at])
            else:
                T.buffer_store(self.xsum, total[0] * T.int32(self.w.offset), [at])

    def task(self, task) -> None:
        """Output columns task * columns ...: their weight rows unpacked (`unpack_row`) with
        their scales, then their dot products with every block of row vectors."""
        w, columns, groups = self.w, self.columns, self.groups
        row_words = self.layout.words * self.low_words
        words = T.alloc_buffer((columns * row_words,), U32)
        scale = T.alloc_buffer((columns * groups,), F32)
        shift = T.alloc_buffer((columns * groups,), F32) if self.bias else None
        lanes = divisor(groups, ROWS)
        for c in range(columns):
            n = task * columns + c
            self.unpack_row(n, words, c * row_words)
            with T.serial(0, groups // lanes) as go, T.vectorized(0, lanes) as gi:
                g = go * lanes + gi
                T.buffer_store(scale, w.scale(n, g), [c * groups + g])
                if shift is not None:
                    T.buffer_store(shift, w.bias(n, g), [c * groups + g])
        acc = T.alloc_buffer((columns * self.row_vectors * ROWS,), F32)
        blocks = self.m_rows // ROWS // self.row_vectors
        with T.serial(0, blocks) as block:
            self.dot_block(task, block, words, scale, shift, acc)

    def unpack_row(self, n, words, base: int) -> None:
        """Row n's fields as the dot products' words, word (h, j) at base + h * low_words +
        j, vectorized along the low words."""
        w, layout = self.w, self.layout
        lanes = divisor(self.low_words, ROWS)
        with T.serial(0, self.low_words // lanes) as jo, T.vectorized(0, lanes) as ji:
            j = jo * lanes + ji
            low = w.low[n, j]
            for h in range(layout.words):
                word = low >> tirx.const(h * w.low_bits, U32) if h else low
                if w.low_bits < 8:
                    word = word & tirx.const(0x01010101 * ((1 << w.low_bits) - 1), U32)
                if w.high is not None:
                    for b in range(4):
                        high = high_field(w.high, n, layout.k(j, h, b), w.high_bits,
                                          layout.per_low)  # fmt: skip
                        word = word | (high << tirx.const(8 * b + w.low_bits, U32))
                T.buffer_store(words, word, [base + h * self.low_words + j])

    def dot_block(self, task, block, words, scale, shift, acc) -> None:
        """y's rows of one block of row vectors, in the task's columns: per span, each
        column's int32 sums with each row vector (in registers), then scaled into float32
        sums (acc)."""
        columns, rows, groups = self.columns, self.row_vectors, self.groups
        span, row_words = self.layout.span, self.layout.words * self.low_words
        vector = [(c, v) for c in range(columns) for v in range(rows)]
        lanes = len(vector) * ROWS
        T.buffer_store(acc, T.broadcast(T.float32(0), lanes), [T.ramp(0, 1, lanes)])
        with T.serial(0, self.spans) as s:
            sums = {cv: T.broadcast(T.int32(0), ROWS) for cv in vector}
            for step in range(self.steps):
                j = s * self.steps + step
                for h in range(self.layout.words):
                    xv = [self.xq.vload([self.x_at(block * rows + v, h, j)], f"{I8}x64")
                          for v in range(rows)]  # fmt: skip
                    for c in range(columns):
                        word = words[c * row_words + h * self.low_words + j]
                        word = T.broadcast(T.reinterpret(I32, word), ROWS)
                        for v in range(rows):
                            sums[c, v] = vpdpbusd(sums[c, v], word, xv[v])
            g = s * span // self.w.group
            for (c, v), dot in sums.items():
                at = s * self.m_rows + (block * rows + v) * ROWS
                if not self.bias:
                    dot = dot - self.xsum.vload([at], f"{I32}x16")  # the offset's share
                factor = T.broadcast(scale[c * groups + g], ROWS) * self.xs.vload([at], f"{F32}x16")
                out = (c * rows + v) * ROWS
                value = T.fma(T.Cast(f"{F32}x16", dot), factor, acc.vload([out], f"{F32}x16"))
                if shift is not None:
                    value = T.fma(T.broadcast(shift[c * groups + g], ROWS),
                                  self.xsum.vload([at], f"{F32}x16"), value)  # fmt: skip
                T.buffer_store(acc, value, [T.ramp(out, 1, ROWS)])
        with T.serial(0, ROWS * rows) as i:
            for c in range(columns):
                T.buffer_store(self.y, acc[c * rows * ROWS + i].astype(self.y.dtype),
                               [block * rows * ROWS + i, task * columns + c])  # fmt: skip
