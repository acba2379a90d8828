"""The entry points of a sentence encoder, and how a runtime drives them (the plan's `task`,
docs/formats.md).

    embed_BxS(ids[B, S], mask[B, S]) -> vectors [B, dim]

One entry point per (batch, length) bucket chosen at compile time. A text's token ids fill
the first positions of a row and the mask marks them with 1; padding rows and positions hold
0. The vectors are the encoder's last hidden states averaged over the positions the mask
keeps, then L2-normalized. An architecture subclasses `SentenceEncoder`, builds its layers and
implements `encode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .base import ACC
from .causal_lm import MODE, named_args

# what a masked attention score becomes: its exp underflows to exactly 0, so a padded
# position changes no real position's output
MASKED = -1e30


def bucket_function(batch: int, length: int) -> str:
    return f"embed_{batch}x{length}"


class SentenceEncoder(nn.Module):
    """A sentence encoder's entry points. Subclasses set their layers, then call
    `_entry_points`, and implement `encode(ids, mask)` -> hidden states [B * S, dim]."""

    def _entry_points(self, buckets: Sequence[tuple[int, int]], vocab_size: int, dim: int
                      ) -> None:  # fmt: skip
        self.buckets, self.vocab_size, self.dim = [tuple(b) for b in buckets], vocab_size, dim
        for batch, length in self.buckets:
            setattr(self, bucket_function(batch, length), named_args(self._embed, ["ids", "mask"]))

    def encode(self, ids: nn.Tensor, mask: nn.Tensor) -> nn.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode")

    def tables(self) -> dict[str, Any]:
        return {}

    def state_names(self) -> list[str]:
        return []  # nothing is kept between calls

    def _embed(self, ids: nn.Tensor, mask: nn.Tensor) -> nn.Tensor:
        return l2_normalize(mean_pool(self.encode(ids, mask), mask))

    def export_spec(self) -> dict[str, Any]:
        return {
            bucket_function(b, s): {"ids": nn.spec.Tensor([b, s], "int32"),
                                    "mask": nn.spec.Tensor([b, s], "int32"), "$": MODE}
            for b, s in self.buckets
        }  # fmt: skip

    def task(self) -> dict[str, Any]:
        """How a runtime drives the entry points: one role per bucket, named "BxS"."""
        task: dict[str, Any] = {"kind": "embedding", "dim": self.dim,
                                "max_length": max(s for _, s in self.buckets)}  # fmt: skip
        for b, s in self.buckets:
            f = bucket_function(b, s)
            task[f"{b}x{s}"] = {"function": f, "batch": b, "length": s,
                                "tokens": f"{f}.ids", "mask": f"{f}.mask",
                                "token_range": [0, self.vocab_size]}  # fmt: skip
        return task


def attention_bias(mask: nn.Tensor) -> nn.Tensor:
    """[B, S] mask -> [B, 1, 1, S] float32 added to attention scores: 0 where the mask keeps a
    key, `MASKED` where it does not."""

    def compute(m: te.Tensor):
        b, s = m.shape
        zero, masked = tirx.const(0.0, ACC), tirx.const(MASKED, ACC)
        return te.compute((b, 1, 1, s), lambda i, _h, _q, j: tirx.Select(m[i, j] != 0, zero,
                                                                         masked),
                          name="attention_bias")  # fmt: skip

    return op.tensor_expr_op(compute, "attention_bias", [mask])


def mean_pool(hidden: nn.Tensor, mask: nn.Tensor) -> nn.Tensor:
    """Hidden states [B * S, dim] averaged over each row's positions the mask [B, S] keeps ->
    [B, dim] float32 (a row the mask keeps nothing of averages to 0). Two kernels, each one
    reduction as GPU schedules take them: each position's weight, then the weighted sum."""

    def weights(m: te.Tensor):
        rows, length = m.shape
        s = te.reduce_axis((0, length), name="s")
        kept = te.compute((rows,), lambda b: te.sum(m[b, s].astype(ACC), axis=s), name="kept")
        return te.compute((rows, length), lambda b, j: m[b, j].astype(ACC) / tirx.max(kept[b], 1.0),
                          name="pool_weights")  # fmt: skip

    def weighted_sum(h: te.Tensor, w: te.Tensor):
        rows, length = w.shape
        s = te.reduce_axis((0, length), name="s")
        return te.compute((rows, h.shape[1]),
                          lambda b, d: te.sum(h[b * length + s, d].astype(ACC) * w[b, s], axis=s),
                          name="mean_pool")  # fmt: skip

    w = op.tensor_expr_op(weights, "pool_weights", [mask])
    return op.tensor_expr_op(weighted_sum, "mean_pool", [hidden, w])


def l2_normalize(x: nn.Tensor) -> nn.Tensor:
    """Each row of x [B, dim] divided by its L2 norm (a zero row stays zero)."""

    def compute(t: te.Tensor):
        rows, dim = t.shape
        d = te.reduce_axis((0, dim), name="d")
        sq = te.compute((rows,), lambda b: te.sum(t[b, d] * t[b, d], axis=d), name="sum_sq")
        return te.compute((rows, dim), lambda b, j: t[b, j] / tirx.max(tirx.sqrt(sq[b]), 1e-12),
                          name="l2_normalize")  # fmt: skip

    return op.tensor_expr_op(compute, "l2_normalize", [x])
