"""Faster forms of math on a CPU: exp as a polynomial that vectorizes (LLVM calls expf once
per lane), sigmoid and tanh through it, and half-precision values converted by the CPU
itself."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)  # fmt: skip


def fast_exp(x):
    """exp(x) in float32 within 2 ulp (Cephes expf): 2^n * p(r) with x = n ln2 + r."""
    f32 = "float32"
    x = tirx.max(tirx.min(x, tirx.const(88.37626, f32)), tirx.const(-87.33654, f32))
    n = tirx.floor(x * tirx.const(1.4426950408889634, f32) + tirx.const(0.5, f32))
    # ln 2 in two parts, so that n * ln2 is exact in the first
    r = x - n * tirx.const(0.693359375, f32) - n * tirx.const(-2.12194440e-4, f32)
    poly = tirx.const(_EXP_POLY[0], f32)
    for c in _EXP_POLY[1:]:
        poly = poly * r + tirx.const(c, f32)
    y = poly * r * r + r + tirx.const(1.0, f32)
    bits = (n.astype("int32") + tirx.const(127, "int32")) << tirx.const(23, "int32")
    return y * tirx.reinterpret(f32, bits)


def fast_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """float32 exp, sigmoid and tanh as `fast_exp` polynomials, and halves as
    `native_halves`."""
    return native_halves(_fast_exp_calls(func))


def _fast_exp_calls(func: tirx.PrimFunc) -> tirx.PrimFunc:

    def visit(call):
        op = getattr(call.op, "name", None)
        dtype = str(getattr(call.ty, "dtype", ""))
        if op not in ("tirx.exp", "tirx.sigmoid", "tirx.tanh") or dtype != "float32":
            return call
        (x,) = call.args
        one = tirx.const(1.0, "float32")
        if op == "tirx.exp":
            return fast_exp(x)
        if op == "tirx.tanh":  # 1 - 2 / (e^2x + 1): within 1e-7 of tanh, absolutely
            return one - tirx.const(2.0, "float32") / (fast_exp(x + x) + one)
        return one / (one + fast_exp(-x))

    return tvm_ffi.structural_map(func, (tvm.ir.expr.Call, visit))




def native_halves(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Half-precision values that weight formats unpack with integer operations
    (`tapml.formats.half_to_float`, which targets without 16-bit floats need), converted by
    the CPU's own instruction instead (F16C: one per vector; measured: a Q4_1 GEMV with its
    weights in cache 1.5x faster)."""
    from tapml.formats import half_to_float

    def visit(select):
        bits = _half_bits(select)
        if bits is None or not tvm_ffi.structural_equal(half_to_float(bits), select):
            return select
        return tirx.Cast("float32", tirx.reinterpret("float16", tirx.Cast("uint16", bits)))

    return tvm_ffi.structural_map(func, (tirx.Select, visit))


def _half_bits(select: tirx.Select):
    """The bits `half_to_float(bits)` reads, if `select` has its outer shape:
    Select(((bits >> 10) & 31) == 0, ...)."""
    cond = select.condition
    if not isinstance(cond, tirx.EQ) or not isinstance(cond.a, tirx.BitwiseAnd):
        return None
    shifted = cond.a.a
    return shifted.a if isinstance(shifted, tirx.RShift) else None
