"""What tapml's layers share."""

from __future__ import annotations

from tvm import te

ACC = "float32"  # what every kernel accumulates and computes in


def cast(t: te.Tensor, dtype: str) -> te.Tensor:
    """`t` as `dtype` (itself if it already is)."""
    if t.dtype == dtype:
        return t
    return te.compute(t.shape, lambda *i: t(*i).astype(dtype), name="cast")
