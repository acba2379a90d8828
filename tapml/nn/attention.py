"""Causal attention over explicit KV caches, and the last valid row of a padded chunk."""

from __future__ import annotations

import functools
import math

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.script import tirx as T

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


def attention(q: nn.Tensor, k_cache: nn.Tensor, v_cache: nn.Tensor, pos: tirx.Var,
              window: int | None = None, scale: float | None = None) -> nn.Tensor:  # fmt: skip
    """Causal attention of the queries q [s, heads, D] (positions pos..) over the key cache
    (`key_cache_shape`) and the value cache [KV heads, max_context, D] -> [s, heads*D].

    Query row i sees cache rows 0..pos+i, or with a sliding `window` of W positions only
    the last W of them (pos+i-W+1..pos+i); the loops visit just those tiles, so the cost
    grows with the context seen, not with the cache's size. Scores are scaled by `scale`
    (default 1/sqrt(D)). Softmax is computed online in float32, one tile of positions at a
    time. Each (row, KV head, part) is independent, and so is each (row, head) of the
    combination: targets' schedules spread them over threads.
    """
    splits = ATTENTION_SPLITS if int(q.shape[0]) == 1 else 1
    parts = _attention_parts(q, k_cache, v_cache, pos, splits, window, scale)
    return _attention_combine(parts, q.dtype)


def _attention_parts(q: nn.Tensor, k_cache: nn.Tensor, v_cache: nn.Tensor, pos: tirx.Var,
                     splits: int, window: int | None, scale: float | None
                     ) -> nn.Tensor:  # fmt: skip
    """[s, heads, splits, D + 2]: for each part of a row's positions and each query head, the
    softmax-weighted sum of values before normalization (D), the scores' max and the sum of
    their exponentials. A task reads each cache row of its part once for all the query heads
    of one KV head."""
    rows, heads, dim = (int(x) for x in q.shape)
    kv_heads, tiles, max_ctx = int(k_cache.shape[0]), int(k_cache.shape[1]), int(v_cache.shape[1])
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    attend = _attend(rows, heads, dim, kv_heads, tiles, max_ctx, q.dtype, k_cache.dtype,
                     v_cache.dtype, splits, window, scale)  # fmt: skip
    out = nn.Tensor.placeholder([rows, heads, splits, dim + 2], "float32")
    return op.tensor_ir_op(attend, "attention", [q, k_cache, v_cache, pos], out)


@functools.cache  # parsing TVMScript takes a tenth of a second, and every layer asks alike
def _attend(rows: int, heads: int, dim: int, kv_heads: int, tiles: int, max_ctx: int,
            dtype: str, k_dtype: str, v_dtype: str, splits: int, window: int | None,
            scale: float) -> tirx.PrimFunc:  # fmt: skip
    """`_attention_parts`' kernel for these shapes."""
    tile = ATTENTION_TILE  # the trees below sum 16 lanes
    group = heads // kv_heads
    i64 = T.int64

    def lowest(p, i):
        """The first position row i sees (int32: WGSL has no 64-bit integers)."""
        if window is None:
            return T.int32(0)
        return T.max(T.Cast("int32", p + i + 1) - T.int32(window), T.int32(0))

    def visible(t, t0, count, first, lo):
        """Whether position t of tile t0 of this part is one the row sees."""
        before_end = t < count - t0 * tile
        if window is None:
            return before_end
        return tirx.And(before_end, first + t0 * tile + t >= lo)

    @T.prim_func(private=True, s_tir=True)
    def attend(
        q_in: T.Buffer((i64(rows), i64(heads), i64(dim)), dtype),
        kc: T.Buffer((i64(kv_heads), i64(tiles), i64(dim), i64(tile)), k_dtype),
        vc: T.Buffer((i64(kv_heads), i64(max_ctx), i64(dim)), v_dtype),
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
                # the row sees positions lo..p+i; this part the `count` from `first`: whole
                # tiles from the one lo is in, the last part the rest
                lo: T.int32 = lowest(p, i)
                start: T.int32 = lo // tile * tile
                span: T.int32 = (T.Cast("int32", p + i + 1) - start + splits * tile - 1) // (
                    splits * tile) * tile
                first: T.int32 = start + T.Cast("int32", sp) * span
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
                        for t in range(tile):  # positions the row cannot see get no weight
                            score[g, t] = T.Select(
                                visible(t, t0, count, first, lo),
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

    return attend


def _attention_combine(parts: nn.Tensor, dtype: str) -> nn.Tensor:
    """The parts of each (row, head) rescaled to their common max, summed and normalized:
    [s, heads, splits, D + 2] -> [s, heads * D]."""
    rows, heads, splits, dim = (int(x) for x in parts.shape)
    out = nn.Tensor.placeholder([rows, heads * (dim - 2)], dtype)
    combine = _combine(rows, heads, splits, dim - 2, dtype)
    return op.tensor_ir_op(combine, "attention_combine", [parts], out)


@functools.cache
def _combine(rows: int, heads: int, splits: int, dim: int, dtype: str) -> tirx.PrimFunc:
    """`_attention_combine`'s kernel for these shapes."""
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

    return combine


def last_valid_row(x: nn.Tensor, n_valid: tirx.Var) -> nn.Tensor:
    """Row n_valid-1 of x [s, d] as [1, d]: the position whose logits a padded chunk needs."""

    def compute(x_te: te.Tensor, n: tirx.Var):
        return te.compute((1, x_te.shape[1]), lambda _, j: x_te[n - 1, j], name="take_row")

    return op.tensor_expr_op(compute, "last_valid_row", [x, n_valid])
