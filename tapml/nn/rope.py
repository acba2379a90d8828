"""Rotary position embeddings, applied where new keys and values are written to the caches."""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.script import tirx as T

from .base import ACC


class RotaryTables(nn.Module):
    """cos/sin of every (position, pair) angle, filled in when weights are converted."""

    def __init__(self, max_context: int, head_dim: int, pairs: str = "adjacent"):
        self.pairs = pairs  # (x[2i], x[2i+1]) are rotated together, or (x[i], x[i + d/2]): "halves"
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
        return _rope_kv_write(qkv, self.cos, self.sin, heads, k_cache, v_cache, pos, n_valid,
                              self.pairs)  # fmt: skip


def _rope_kv_write(qkv: nn.Tensor, cos: nn.Tensor, sin: nn.Tensor, heads: int,
                   k_cache: nn.Tensor, v_cache: nn.Tensor, pos: tirx.Var, n_valid,
                   pairs: str) -> tuple[nn.Tensor, nn.Tensor, nn.Tensor]:  # fmt: skip
    rows, all_heads, dim = (int(x) for x in qkv.shape)
    kv_heads, max_ctx = int(v_cache.shape[0]), int(v_cache.shape[1])
    k_shape = tuple(int(x) for x in k_cache.shape)
    rope_kv = _rope_kv(rows, all_heads, dim, heads, kv_heads, max_ctx, int(cos.shape[0]),
                       k_shape, qkv.dtype, k_cache.dtype, v_cache.dtype, pairs)  # fmt: skip
    if isinstance(n_valid, int):
        n_valid = tirx.IntImm("int64", n_valid)
    out = [
        nn.Tensor.placeholder([rows, heads, dim], qkv.dtype),
        nn.Tensor.placeholder(list(k_shape), k_cache.dtype),
        nn.Tensor.placeholder([kv_heads, max_ctx, dim], v_cache.dtype),
    ]
    args = [qkv, cos, sin, k_cache, v_cache, pos, n_valid]
    return op.tensor_ir_inplace_op(rope_kv, "rope_kv_write", args, [-1, 3, 4], out)


@functools.cache  # parsing TVMScript takes a tenth of a second, and every layer asks alike
def _rope_kv(rows: int, all_heads: int, dim: int, heads: int, kv_heads: int, max_ctx: int,
             positions: int, k_shape: tuple[int, ...], dtype: str, k_dtype: str, v_dtype: str,
             pairs: str) -> tirx.PrimFunc:  # fmt: skip
    """`_rope_kv_write`'s kernel for these shapes."""
    tables, i64 = (positions, dim // 2), T.int64
    tile = k_shape[3]
    half = dim // 2

    def rotated(x, cos_t, sin_t, p, i, h, d):
        """Element d of head h of row i, rotated with its pair partner."""
        if pairs == "adjacent":
            pair, is_first, partner = d // 2, d % 2 == 0, d // 2 * 2
            a, b = x[i, h, partner], x[i, h, partner + 1]
        else:
            pair, is_first = d % half, d < half
            a, b = x[i, h, pair], x[i, h, pair + half]
        c, s = cos_t[p + i, pair], sin_t[p + i, pair]
        a, b = T.Cast(ACC, a), T.Cast(ACC, b)
        return T.Cast(dtype, T.Select(is_first, a * c - b * s, a * s + b * c))

    @T.prim_func(private=True, s_tir=True)
    def rope_kv(
        x: T.Buffer((i64(rows), i64(all_heads), i64(dim)), dtype),
        cos_t: T.Buffer((i64(tables[0]), i64(tables[1])), "float32"),
        sin_t: T.Buffer((i64(tables[0]), i64(tables[1])), "float32"),
        kc: T.Buffer([i64(x) for x in k_shape], k_dtype),
        vc: T.Buffer((i64(kv_heads), i64(max_ctx), i64(dim)), v_dtype),
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

    return rope_kv


def rotary_tables(max_context: int, head_dim: int, theta: float):
    """The values of RotaryTables' parameters (numpy, float32)."""
    import numpy as np

    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(max_context, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
