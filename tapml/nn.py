"""tapml's Relax layers: each one becomes a kernel of the plan.

They are written as tensor expressions rather than with Relax's high-level ops so that
every kernel has a known shape: matmuls accumulate in float32 and read quantized weights
directly (dequantize fused into the matmul), RoPE reads precomputed tables (in-kernel
sin/cos is imprecise on some GPUs), and attention only visits the positions written so far.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.script import tirx as T

from .formats import Float, WeightFormat

ACC = "float32"


def _add_planes(module: nn.Module, fmt: WeightFormat, shape: tuple[int, ...]) -> list[str]:
    """Give `module` one parameter per plane of a weight of `shape` stored in `fmt`."""
    planes = fmt.planes(shape)
    for plane, (plane_shape, dtype) in planes.items():
        setattr(module, plane, nn.Parameter(list(plane_shape), dtype))
    return list(planes)


class Linear(nn.Module):
    """y = x @ W^T for a weight W [out, in] stored in a weight format, which the matmul
    kernel reads itself (dequantization fused into the matmul).

    `out_features` may list the rows of several projections of the same input, stacked in
    that order (Q, K and V): in one format they are one matrix and one matmul; in different
    formats (a GGUF may store them so) each part is a Linear of its own (`parts`, see
    `tapml.quantization.part_prefixes`) and their outputs are concatenated.
    """

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 formats: WeightFormat | Sequence[WeightFormat]):  # fmt: skip
        outs = [out_features] if isinstance(out_features, int) else list(out_features)
        fmts = [formats] * len(outs) if isinstance(formats, WeightFormat) else list(formats)
        if len(fmts) != len(outs):
            raise ValueError(f"{len(outs)} stacked projections but {len(fmts)} formats")
        self.in_features, self.out_features = in_features, sum(outs)
        self.parts = None
        if len(set(fmts)) == 1:
            self.format = fmts[0]
            self._planes = _add_planes(self, self.format, (self.out_features, in_features))
        else:
            self.parts = nn.ModuleList([Linear(in_features, o, f)
                                        for o, f in zip(outs, fmts, strict=True)])  # fmt: skip

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if self.parts is not None:
            return op.concat([part(x) for part in self.parts], dim=1)
        return matmul(x, self.format, _planes_of(self))


def _planes_of(module: nn.Module) -> dict[str, nn.Tensor]:
    return {plane: getattr(module, plane) for plane in module._planes}


def matmul(x: nn.Tensor, fmt: WeightFormat, planes: dict[str, nn.Tensor]) -> nn.Tensor:
    """x @ W^T [s, out], W [out, in] read from its planes in `fmt` by the kernel: "matmul"
    for float weights, "dequantize_matmul" for quantized ones."""
    name = "dequantize_matmul" if fmt.quantized else "matmul"

    def compute(x_te: te.Tensor, *plane_tes: te.Tensor):
        weight = fmt.weight(dict(zip(planes, plane_tes, strict=True)))
        rows = int(planes[next(iter(planes))].shape[0])
        w = te.compute((rows, x_te.shape[1]), weight,
                       name="dequantize" if fmt.quantized else "weight")  # fmt: skip
        return _matmul(x_te, w, name)

    return op.tensor_expr_op(compute, name, [x, *planes.values()])


def _matmul(x_te: te.Tensor, w: te.Tensor, name: str) -> te.Tensor:
    """x @ w^T accumulated in float32, for w [N, K] produced by a stage of the same kernel.

    The weight stage (a cast or a dequantization) is a block of its own so that schedules
    can either inline it (one output row) or stage weight tiles for many rows at once.
    """
    k = te.reduce_axis((0, x_te.shape[1]), name="k")
    acc = te.compute(
        (x_te.shape[0], w.shape[0]),
        lambda m, n: te.sum(x_te[m, k].astype(ACC) * w[n, k], axis=k),
        name=name,
    )
    return _cast(acc, x_te.dtype)


def _cast(t: te.Tensor, dtype: str) -> te.Tensor:
    if t.dtype == dtype:
        return t
    return te.compute(t.shape, lambda *i: t(*i).astype(dtype), name="cast")


def silu_multiply(gate_up: nn.Tensor) -> nn.Tensor:
    """[s, 2I] (gate, then up) -> silu(gate) * up [s, I], computed in float32."""

    def compute(x: te.Tensor):
        half = x.shape[1] // 2

        def value(i, j):
            gate, up = x[i, j].astype(ACC), x[i, j + half].astype(ACC)
            return (gate * tirx.sigmoid(gate) * up).astype(x.dtype)

        return te.compute((x.shape[0], half), value, name="silu_multiply")

    return op.tensor_expr_op(compute, "silu_multiply", [gate_up])


class Embedding(nn.Module):
    """Token embedding [vocab, dim] in a weight format, read by the lookup kernel itself; with
    tied weights it is also the output layer (`project`). `dtype`: the activations'."""

    def __init__(self, vocab_size: int, dim: int, fmt: WeightFormat, dtype: str):
        self.vocab_size, self.dim, self.format, self.dtype = vocab_size, dim, fmt, dtype
        self._planes = _add_planes(self, fmt, (vocab_size, dim))

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        planes = _planes_of(self)
        if isinstance(self.format, Float) and self.format.dtype == self.dtype:
            return op.take(planes["weight"], ids, axis=0)
        fmt, dtype = self.format, self.dtype

        def compute(ids_te: te.Tensor, *plane_tes: te.Tensor):
            weight = fmt.weight(dict(zip(planes, plane_tes, strict=True)))
            return te.compute(
                (ids_te.shape[0], self.dim),
                lambda i, k: weight(ids_te[i], k).astype(dtype),
                name="dequantize_take",
            )

        return op.tensor_expr_op(compute, "dequantize_take", [ids, *planes.values()])

    def project(self, x: nn.Tensor) -> nn.Tensor:
        """Logits from hidden states, computed in float32."""
        logits = matmul(x, self.format, _planes_of(self))
        return logits.astype("float32") if logits.dtype != "float32" else logits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: str):
        self.eps = eps
        self.weight = nn.Parameter((dim,), dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        eps = self.eps

        def compute(x_te: te.Tensor, w_te: te.Tensor):
            rows, dim = x_te.shape
            k = te.reduce_axis((0, dim), name="k")
            sq = te.compute(
                (rows,),
                lambda i: te.sum(x_te[i, k].astype(ACC) * x_te[i, k].astype(ACC), axis=k),
                name="sum_sq",
            )

            def norm(i, j):
                inv = tirx.rsqrt(sq[i] / tirx.const(int(dim), ACC) + tirx.const(eps, ACC))
                return (x_te[i, j].astype(ACC) * inv * w_te[j].astype(ACC)).astype(x_te.dtype)

            return te.compute(x_te.shape, norm, name="rms_norm")

        return op.tensor_expr_op(compute, "rms_norm", [x, self.weight])


class RotaryTables(nn.Module):
    """cos/sin of every (position, pair) angle, filled in when weights are converted."""

    def __init__(self, max_context: int, head_dim: int):
        self.cos = nn.Parameter((max_context, head_dim // 2), "float32")
        self.sin = nn.Parameter((max_context, head_dim // 2), "float32")

    def forward(self, qkv: nn.Tensor, heads: int, k_cache: nn.Tensor, v_cache: nn.Tensor,
                pos: tirx.Var, n_valid) -> tuple[nn.Tensor, nn.Tensor, nn.Tensor]:  # fmt: skip
        """RoPE on a fused QKV projection, and the new keys and values into the caches.

        qkv [s, heads + 2 * kv_heads, head_dim] holds rows at positions pos..pos+s-1: the
        query heads, then the key heads, then the value heads. Returns the rotated queries
        [s, heads, head_dim] and the caches (see `key_cache_shape`) with rows [0, n_valid)
        of the rotated keys and of the values written at pos.. in place. One kernel, so that
        a decode step does not pay three launches for a few hundred values.
        """
        return _rope_kv_write(qkv, self.cos, self.sin, heads, k_cache, v_cache, pos, n_valid)


def _rope_kv_write(qkv: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor, heads: int,
                   k_cache: nn.Tensor, v_cache: nn.Tensor, pos: tirx.Var, n_valid
                   ) -> tuple[nn.Tensor, nn.Tensor, nn.Tensor]:  # fmt: skip
    rows, all_heads, dim = (int(x) for x in qkv.shape)
    kv_heads, max_ctx = int(v_cache.shape[0]), int(v_cache.shape[1])
    tables, dtype, i64 = (int(cos.shape[0]), dim // 2), qkv.dtype, T.int64
    k_shape = [int(x) for x in k_cache.shape]
    tile = k_shape[3]

    def rotated(x, cos_t, sin_t, p, i, h, d):
        """Element d of head h of row i, rotated with its pair partner (adjacent pairs)."""
        pair = d // 2
        c, s = cos_t[p + i, pair], sin_t[p + i, pair]
        even, odd = T.Cast(ACC, x[i, h, pair * 2]), T.Cast(ACC, x[i, h, pair * 2 + 1])
        return T.Cast(dtype, T.Select(d % 2 == 0, even * c - odd * s, even * s + odd * c))

    @T.prim_func(private=True, s_tir=True)
    def rope_kv(
        x: T.Buffer((i64(rows), i64(all_heads), i64(dim)), dtype),
        cos_t: T.Buffer((i64(tables[0]), i64(tables[1])), "float32"),
        sin_t: T.Buffer((i64(tables[0]), i64(tables[1])), "float32"),
        kc: T.Buffer([i64(x) for x in k_shape], k_cache.dtype),
        vc: T.Buffer((i64(kv_heads), i64(max_ctx), i64(dim)), v_cache.dtype),
        p: T.int64,
        valid: T.int64,
        q: T.Buffer((i64(rows), i64(heads), i64(dim)), dtype),
    ):
        for i, h, d in T.grid(i64(rows), i64(heads), i64(dim)):
            with T.sblock("rope_q"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                q[vi, vh, vd] = rotated(x, cos_t, sin_t, p, vi, vh, vd)
        for i, h, d in T.grid(valid, i64(kv_heads), i64(dim)):
            with T.sblock("rope_k"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                kc[vh, (p + vi) // tile, vd, (p + vi) % tile] = T.Cast(
                    kc.dtype, rotated(x, cos_t, sin_t, p, vi, heads + vh, vd)
                )
        for i, h, d in T.grid(valid, i64(kv_heads), i64(dim)):
            with T.sblock("write_v"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                vc[vh, p + vi, vd] = T.Cast(vc.dtype, x[vi, heads + kv_heads + vh, vd])

    if isinstance(n_valid, int):
        n_valid = tirx.IntImm("int64", n_valid)
    out = [
        nn.Tensor.placeholder([rows, heads, dim], dtype),
        nn.Tensor.placeholder(k_shape, k_cache.dtype),
        nn.Tensor.placeholder([kv_heads, max_ctx, dim], v_cache.dtype),
    ]
    args = [qkv, cos, sin, k_cache, v_cache, pos, n_valid]
    return op.tensor_ir_inplace_op(rope_kv, "rope_kv_write", args, [-1, 3, 4], out)


def rotary_tables(max_context: int, head_dim: int, theta: float):
    """The values of RotaryTables' parameters (numpy, float32)."""
    import numpy as np

    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(max_context, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# Attention visits cache positions in tiles of TILE (one softmax rescale per tile). The key
# cache is stored in those tiles, transposed: [KV heads, tiles, D, TILE], so that a tile's
# scores are TILE-wide vector multiply-adds over D, with no sum across a vector per position
# (on a CPU that sum was two thirds of attention's instructions); the value cache stays
# [KV heads, max_context, D], rows of D. The tile's max and sum are trees over its 16 lanes.
# Loops have fixed widths and no loop-carried dependency, which a CPU schedule turns into
# vector instructions and a GPU thread runs as plain loops. A task serves all the query heads
# that share a KV head, so each cache row is read once, and a decode row splits its positions
# into SPLITS parts, attended separately and then combined, so that the few KV heads of one
# row still make enough tasks for every thread. Queries and cache rows are read where they
# lie rather than copied into per-task arrays: a GPU thread's private memory must stay small
# (lavapipe left invocations of a 256-wide workgroup unrun).
ATTENTION_TILE = 16
ATTENTION_SPLITS = 4


def key_cache_shape(kv_heads: int, max_context: int, head_dim: int) -> list[int]:
    """The key cache's shape: positions in tiles of ATTENTION_TILE, each stored transposed
    (the position last); the last tile is padded."""
    tiles = -(-max_context // ATTENTION_TILE)
    return [kv_heads, tiles, head_dim, ATTENTION_TILE]


def attention(q: nn.Tensor, k_cache: nn.Tensor, v_cache: nn.Tensor, pos: tirx.Var
              ) -> nn.Tensor:  # fmt: skip
    """Causal attention of the queries q [s, heads, D] (positions pos..) over the key cache
    (`key_cache_shape`) and the value cache [KV heads, max_context, D] -> [s, heads*D].

    Query row i sees cache rows 0..pos+i; the loops stop there, so the cost grows with the
    context used, not with the cache's size. Softmax is computed online in float32, one tile
    of positions at a time. Each (row, KV head, part) is independent, and so is each
    (row, head) of the combination: targets' schedules spread them over threads.
    """
    splits = ATTENTION_SPLITS if int(q.shape[0]) == 1 else 1
    parts = _attention_parts(q, k_cache, v_cache, pos, splits)
    return _attention_combine(parts, q.dtype)


def _attention_parts(q: nn.Tensor, k_cache: nn.Tensor, v_cache: nn.Tensor, pos: tirx.Var,
                     splits: int) -> nn.Tensor:  # fmt: skip
    """[s, heads, splits, D + 2]: for each part of a row's positions and each query head, the
    softmax-weighted sum of values before normalization (D), the scores' max and the sum of
    their exponentials. A task reads each cache row of its part once for all the query heads
    of one KV head."""
    rows, heads, dim = (int(x) for x in q.shape)
    kv_heads, tiles, max_ctx = int(k_cache.shape[0]), int(k_cache.shape[1]), int(v_cache.shape[1])
    tile = ATTENTION_TILE  # the trees below sum 16 lanes
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim)
    dtype = q.dtype
    i64 = T.int64

    @T.prim_func(private=True, s_tir=True)
    def attend(
        q_in: T.Buffer((i64(rows), i64(heads), i64(dim)), dtype),
        kc: T.Buffer((i64(kv_heads), i64(tiles), i64(dim), i64(tile)), k_cache.dtype),
        vc: T.Buffer((i64(kv_heads), i64(max_ctx), i64(dim)), v_cache.dtype),
        p: T.int64,
        out: T.Buffer((i64(rows), i64(heads), i64(splits), i64(dim + 2)), "float32"),
    ):
        for row, kv_head, split in T.grid(i64(rows), i64(kv_heads), i64(splits)):
            with T.sblock("part"):
                i, kh, sp = T.axis.remap("SSS", [row, kv_head, split])
                T.reads(q_in[i, kh * group : kh * group + group, 0:dim],
                        kc[kh, 0:tiles, 0:dim, 0:tile], vc[kh, 0:max_ctx, 0:dim])  # fmt: skip
                T.writes(out[i, kh * group : kh * group + group, sp, 0 : dim + 2])
                acc = T.alloc_buffer((group, dim), "float32", scope="local")
                # a tile's scores, summed over even and odd dims apart (two chains of
                # additions in flight), then its softmax weights
                score = T.alloc_buffer((group, tile), "float32", scope="local")
                weight = T.alloc_buffer((group, tile), "float32", scope="local")
                # per query head: [0] running max, [1] running sum, [2] this tile's max,
                # [3] the old terms' factor
                run = T.alloc_buffer((group, 4), "float32", scope="local")
                half8 = T.alloc_buffer((8,), "float32", scope="local")  # a tile's max and sum
                half4 = T.alloc_buffer((4,), "float32", scope="local")  # as trees
                half2 = T.alloc_buffer((2,), "float32", scope="local")
                # this part's `count` positions from `first`: whole tiles, the last part the
                # rest (int32: WGSL has no 64-bit integers)
                span: T.int32 = T.Cast("int32", (p + i + splits * tile) // (splits * tile) * tile)
                first: T.int32 = T.Cast("int32", sp) * span
                count: T.int32 = T.min(T.Cast("int32", p + i + 1) - first, span)
                for g in range(group):
                    for d in range(dim):
                        acc[g, d] = T.float32(0)
                    run[g, 0] = T.float32(-3.0e38)
                    run[g, 1] = T.float32(0)
                for t0 in range((T.max(count, 0) + tile - 1) // tile):
                    for g in range(group):
                        for t in range(tile):
                            score[g, t] = T.float32(0)
                        for t in range(tile):
                            weight[g, t] = T.float32(0)
                    for d2 in range(dim // 2):
                        for g in range(group):
                            for t in range(tile):
                                score[g, t] = score[g, t] + T.Cast(
                                    "float32", q_in[i, kh * group + g, d2 * 2]
                                ) * T.Cast("float32", kc[kh, first // tile + t0, d2 * 2, t])
                            for t in range(tile):
                                weight[g, t] = weight[g, t] + T.Cast(
                                    "float32", q_in[i, kh * group + g, d2 * 2 + 1]
                                ) * T.Cast("float32", kc[kh, first // tile + t0, d2 * 2 + 1, t])
                    for _ in range(dim % 2):  # an odd head dim's last
                        for g in range(group):
                            for t in range(tile):
                                score[g, t] = score[g, t] + T.Cast(
                                    "float32", q_in[i, kh * group + g, dim - 1]
                                ) * T.Cast("float32", kc[kh, first // tile + t0, dim - 1, t])
                    for g in range(group):
                        for t in range(tile):  # positions past the end get no weight
                            score[g, t] = T.Select(
                                t < count - t0 * tile,
                                (score[g, t] + weight[g, t]) * T.float32(scale),
                                T.float32(-3.0e38),
                            )
                    for g in range(group):
                        for c in range(8):
                            half8[c] = T.max(score[g, c], score[g, c + 8])
                        for c in range(4):
                            half4[c] = T.max(half8[c], half8[c + 4])
                        for c in range(2):
                            half2[c] = T.max(half4[c], half4[c + 2])
                        run[g, 2] = T.max(run[g, 0], T.max(half2[0], half2[1]))
                        for t in range(tile):
                            weight[g, t] = T.exp(score[g, t] - run[g, 2])
                        for c in range(8):
                            half8[c] = weight[g, c] + weight[g, c + 8]
                        for c in range(4):
                            half4[c] = half8[c] + half8[c + 4]
                        for c in range(2):
                            half2[c] = half4[c] + half4[c + 2]
                        run[g, 3] = T.exp(run[g, 0] - run[g, 2])
                        run[g, 1] = run[g, 1] * run[g, 3] + (half2[0] + half2[1])
                        for d in range(dim):
                            acc[g, d] = acc[g, d] * run[g, 3]
                        run[g, 0] = run[g, 2]
                    for t in range(T.min(tile, count - t0 * tile)):
                        for g in range(group):
                            for d in range(dim):
                                acc[g, d] = acc[g, d] + weight[g, t] * T.Cast(
                                    "float32", vc[kh, first + t0 * tile + t, d]
                                )
                for g in range(group):
                    for d in range(dim):
                        out[i, kh * group + g, sp, d] = acc[g, d]
                    out[i, kh * group + g, sp, dim] = run[g, 0]
                    out[i, kh * group + g, sp, dim + 1] = run[g, 1]

    out = nn.Tensor.placeholder([rows, heads, splits, dim + 2], "float32")
    return op.tensor_ir_op(attend, "attention", [q, k_cache, v_cache, pos], out)


def _attention_combine(parts: nn.Tensor, dtype: str) -> nn.Tensor:
    """The parts of each (row, head) rescaled to their common max, summed and normalized:
    [s, heads, splits, D + 2] -> [s, heads * D]."""
    rows, heads, splits, dim = (int(x) for x in parts.shape)
    dim -= 2
    i64 = T.int64

    @T.prim_func(private=True, s_tir=True)
    def combine(
        part: T.Buffer((i64(rows), i64(heads), i64(splits), i64(dim + 2)), "float32"),
        out: T.Buffer((i64(rows), i64(heads * dim)), dtype),
    ):
        for row, head in T.grid(i64(rows), i64(heads)):
            with T.sblock("combine"):
                i, h = T.axis.remap("SS", [row, head])
                T.reads(part[i, h, 0:splits, 0 : dim + 2])
                T.writes(out[i, h * dim : h * dim + dim])
                acc = T.alloc_buffer((dim,), "float32", scope="local")
                factor = T.alloc_buffer((splits,), "float32", scope="local")
                # [0] the parts' max, [1] the sum of exponentials at that max
                run = T.alloc_buffer((2,), "float32", scope="local")
                run[0] = T.float32(-3.0e38)
                for s in range(splits):
                    run[0] = T.max(run[0], part[i, h, s, dim])
                run[1] = T.float32(0)
                for s in range(splits):
                    factor[s] = T.exp(part[i, h, s, dim] - run[0])
                    run[1] = run[1] + part[i, h, s, dim + 1] * factor[s]
                for d in range(dim):
                    acc[d] = T.float32(0)
                for s in range(splits):
                    for d in range(dim):
                        acc[d] = acc[d] + part[i, h, s, d] * factor[s]
                for d in range(dim):
                    out[i, h * dim + d] = T.Cast(dtype, acc[d] / run[1])

    out = nn.Tensor.placeholder([rows, heads * dim], dtype)
    return op.tensor_ir_op(combine, "attention_combine", [parts], out)


def last_valid_row(x: nn.Tensor, n_valid: tirx.Var) -> nn.Tensor:
    """Row n_valid-1 of x [s, d] as [1, d]: the position whose logits a padded chunk needs."""

    def compute(x_te: te.Tensor, n: tirx.Var):
        return te.compute((1, x_te.shape[1]), lambda _, j: x_te[n - 1, j], name="take_row")

    return op.tensor_expr_op(compute, "last_valid_row", [x, n_valid])
