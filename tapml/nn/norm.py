"""Normalizations, computed in float32 whatever the activations' dtype."""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .base import ACC


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: str):
        self.eps = eps
        self.weight = nn.Parameter((dim,), dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        eps = self.eps

        def compute(x_te: te.Tensor, w_te: te.Tensor):
            normed = _rms_normed(x_te, w_te, eps)
            return te.compute(x_te.shape, lambda i, j: normed(i, j).astype(x_te.dtype),
                              name="rms_norm")  # fmt: skip

        return op.tensor_expr_op(compute, "rms_norm", [x, self.weight])

    def add_to(self, residual: nn.Tensor, x: nn.Tensor) -> nn.Tensor:
        """residual + RMSNorm(x) in one kernel: a norm after attention or the MLP, before
        the residual add (Gemma's post-norms)."""
        eps = self.eps

        def compute(r_te: te.Tensor, x_te: te.Tensor, w_te: te.Tensor):
            normed = _rms_normed(x_te, w_te, eps)
            return te.compute(
                x_te.shape,
                lambda i, j: (r_te[i, j].astype(ACC) + normed(i, j)).astype(r_te.dtype),
                name="add_rms_norm",
            )

        return op.tensor_expr_op(compute, "add_rms_norm", [residual, x, self.weight])


def _rms_normed(x_te: te.Tensor, w_te: te.Tensor, eps: float):
    """(i, j) -> element j of row i of x [rows, dim], RMS-normalized and weighted, in float32
    (its rows' sums of squares a stage of their own)."""
    rows, dim = x_te.shape
    k = te.reduce_axis((0, dim), name="k")
    sq = te.compute(
        (rows,),
        lambda i: te.sum(x_te[i, k].astype(ACC) * x_te[i, k].astype(ACC), axis=k),
        name="sum_sq",
    )

    def normed(i, j):
        inv = tirx.rsqrt(sq[i] / tirx.const(int(dim), ACC) + tirx.const(eps, ACC))
        return x_te[i, j].astype(ACC) * inv * w_te[j].astype(ACC)

    return normed


def qk_norm(qkv: nn.Tensor, q_norm: RMSNorm, k_norm: RMSNorm, heads: int, kv_heads: int
            ) -> nn.Tensor:  # fmt: skip
    """RMSNorm over each head of Q and K in a stacked Q, K, V tensor [s, heads + 2 kv_heads, D]:
    query heads with `q_norm`'s weight, key heads with `k_norm`'s; value heads pass through.
    One kernel for both (QK-norm, as in Gemma-3 and Qwen3)."""
    eps = q_norm.eps

    def compute(x_te: te.Tensor, q_te: te.Tensor, k_te: te.Tensor):
        rows, all_heads, dim = x_te.shape
        d = te.reduce_axis((0, dim), name="d")
        sq = te.compute(
            (rows, all_heads),
            lambda i, h: te.sum(x_te[i, h, d].astype(ACC) * x_te[i, h, d].astype(ACC), axis=d),
            name="sum_sq",
        )

        def norm(i, h, j):
            x = x_te[i, h, j].astype(ACC)
            inv = tirx.rsqrt(sq[i, h] / tirx.const(int(dim), ACC) + tirx.const(eps, ACC))
            weight = tirx.Select(h < heads, q_te[j].astype(ACC), k_te[j].astype(ACC))
            return tirx.Select(h < heads + kv_heads, x * inv * weight, x).astype(x_te.dtype)

        return te.compute(x_te.shape, norm, name="qk_norm")

    return op.tensor_expr_op(compute, "qk_norm", [qkv, q_norm.weight, k_norm.weight])


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim (BERT's)."""

    def __init__(self, dim: int, eps: float, dtype: str):
        self.eps = eps
        self.weight = nn.Parameter((dim,), dtype)
        self.bias = nn.Parameter((dim,), dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        eps = self.eps

        def compute(x_te: te.Tensor, w_te: te.Tensor, b_te: te.Tensor):
            rows, dim = x_te.shape
            n = tirx.const(int(dim), ACC)
            k = te.reduce_axis((0, dim), name="k")
            total = te.compute((rows,), lambda i: te.sum(x_te[i, k].astype(ACC), axis=k),
                               name="sum")  # fmt: skip

            def centered(i, j):
                return x_te[i, j].astype(ACC) - total[i] / n

            k2 = te.reduce_axis((0, dim), name="k2")
            squares = te.compute((rows,), lambda i: te.sum(centered(i, k2) * centered(i, k2),
                                                           axis=k2), name="sum_sq")  # fmt: skip

            def norm(i, j):
                inv = tirx.rsqrt(squares[i] / n + tirx.const(eps, ACC))
                value = centered(i, j) * inv * w_te[j].astype(ACC) + b_te[j].astype(ACC)
                return value.astype(x_te.dtype)

            return te.compute(x_te.shape, norm, name="layer_norm")

        return op.tensor_expr_op(compute, "layer_norm", [x, self.weight, self.bias])
