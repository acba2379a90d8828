"""Activations: SiLU and GELU gates (SwiGLU, GeGLU) and plain GELU, computed in float32."""

from __future__ import annotations

import math

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .base import ACC


def silu_multiply(gate_up: nn.Tensor) -> nn.Tensor:
    """[s, 2I] (gate, then up) -> silu(gate) * up [s, I], computed in float32."""

    def compute(x: te.Tensor):
        half = x.shape[1] // 2

        def value(i, j):
            gate, up = x[i, j].astype(ACC), x[i, j + half].astype(ACC)
            return (gate * tirx.sigmoid(gate) * up).astype(x.dtype)

        return te.compute((x.shape[0], half), value, name="silu_multiply")

    return op.tensor_expr_op(compute, "silu_multiply", [gate_up])


def gelu_multiply(gate_up: nn.Tensor, approximate: str = "tanh") -> nn.Tensor:
    """[s, 2I] (gate, then up) -> gelu(gate) * up [s, I] (GeGLU), computed in float32."""

    def compute(x: te.Tensor):
        half = x.shape[1] // 2

        def value(i, j):
            gate, up = x[i, j].astype(ACC), x[i, j + half].astype(ACC)
            return (_gelu(gate, approximate) * up).astype(x.dtype)

        return te.compute((x.shape[0], half), value, name="gelu_multiply")

    return op.tensor_expr_op(compute, "gelu_multiply", [gate_up])


def gelu(x: nn.Tensor, approximate: str = "erf") -> nn.Tensor:
    """GELU of every element, computed in float32: "erf" (exact) or "tanh" (approximated)."""

    def compute(t: te.Tensor):
        return te.compute(t.shape, lambda *i: _gelu(t(*i).astype(ACC), approximate)
                          .astype(t.dtype), name="gelu")  # fmt: skip

    return op.tensor_expr_op(compute, "gelu", [x])


def _gelu(x, approximate: str):
    """x * Phi(x): with "erf", Phi(x) = (1 + erf(x / sqrt 2)) / 2; with "tanh",
    (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2."""
    f = lambda v: tirx.const(v, ACC)  # noqa: E731
    if approximate == "tanh":
        inner = f(math.sqrt(2 / math.pi)) * (x + f(0.044715) * x * x * x)
        return f(0.5) * x * (f(1.0) + tirx.tanh(inner))
    if approximate == "erf":
        return f(0.5) * x * (f(1.0) + erf(x * f(1 / math.sqrt(2))))
    raise ValueError(f"unknown GELU approximation {approximate!r}; choose erf or tanh")


# Abramowitz and Stegun 7.1.26: |error| < 1.5e-7, as float32 resolves near 1
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x):
    """erf(x) in float32 from a polynomial and exp, on every target (WGSL has no erf)."""
    f = lambda v: tirx.const(v, ACC)  # noqa: E731
    a = tirx.abs(x)
    t = f(1.0) / (f(1.0) + f(_ERF_P) * a)
    poly = f(_ERF_A[-1])
    for c in reversed(_ERF_A[:-1]):
        poly = poly * t + f(c)
    y = f(1.0) - poly * t * tirx.exp(-a * a)
    return tirx.Select(x < f(0.0), -y, y)
