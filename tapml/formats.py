"""Weight formats: how one weight tensor is stored (its planes) and read back as float32.

A format turns a source tensor into one or more arrays, its *planes* (`{base}.{plane}` in the
weights), and gives the float32 value of element (n, k) as a TIR expression, which the
kernels inline where they read the weight (dequantize fused into the matmul and the
embedding lookup), and as numpy, which the reference forward pass and the tests use.

Quantized formats share one shape of formula, which CPU schedules exploit (see
`Affine`): w[n, k] = q * scale[g] + bias[g] for g = k // group, where q is an unsigned
field of a few bits, packed in k order into uint32 words (`pack_fields`), and scale and
bias are float32 values read from the format's other planes. Planes are uint32 or float
arrays only, so WGSL, which has no 8- or 16-bit types, reads every format; half-precision
values are unpacked from words with integer operations (`half_to_float`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import TapmlError

F32, U32 = "float32", "uint32"

# -- packing: numpy ------------------------------------------------------------------------


def pack_fields(q: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] unsigned values of `bits` bits -> uint32 words [N, K * bits / 32], value k in
    field k % (32 / bits) of word k // (32 / bits) (low bits first)."""
    per = 32 // bits
    n, k = q.shape
    if k % per:
        raise TapmlError(f"cannot pack {k} {bits}-bit values per row into whole words")
    q = q.astype(np.uint32).reshape(n, k // per, per)
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def unpack_fields(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack_fields: [N, W] words -> [N, W * 32 / bits] uint32 values."""
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
    q = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(words.shape[0], -1)


def high_words(k: int, bits: int, per_low: int) -> int:
    """Words per row of pack_high for K values: whole blocks of 32 / bits low words."""
    per_word = 32 // bits
    return -(-(k // per_low) // per_word) * per_low


def pack_high(q: np.ndarray, bits: int, per_low: int) -> np.ndarray:
    """[N, K] unsigned values of `bits` bits, the bits above the fields of low words of
    `per_low` fields each -> uint32 words [N, high_words(K)], laid out for vectors of low
    words: with B = 32 / bits, field f of low word j is at bit (j % B) * bits of word
    (j // B) * per_low + f. A vector of up to B consecutive low words (aligned) thus finds
    its f-th fields' high bits in one word, at shifts that step by `bits` across the vector:
    a broadcast and a vector shift instead of a gather. Rows are padded to whole blocks."""
    per_word = 32 // bits
    n, k = q.shape
    low_words = k // per_low
    q = q.astype(np.uint32).reshape(n, low_words, per_low)
    pad = high_words(k, bits, per_low) // per_low * per_word - low_words
    q = np.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(n, -1, per_word, per_low)
    shifts = np.arange(per_word, dtype=np.uint32)[:, None] * np.uint32(bits)
    return np.bitwise_or.reduce(q << shifts, axis=2).reshape(n, -1).astype(np.uint32)


def unpack_high(words: np.ndarray, bits: int, per_low: int, k: int) -> np.ndarray:
    """The inverse of pack_high: [N, high_words(K)] words -> [N, K] uint32 values."""
    per_word = 32 // bits
    n = words.shape[0]
    shifts = np.arange(per_word, dtype=np.uint32)[:, None] * np.uint32(bits)
    q = (words.reshape(n, -1, 1, per_low) >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(n, -1)[:, :k]


def pack_halves(h: np.ndarray) -> np.ndarray:
    """[N, M] float16 (or their uint16 bits) -> [N, ceil(M / 2)] uint32, value i in the low
    half of word i // 2 when i is even; an odd count is padded with a zero."""
    bits = np.ascontiguousarray(h).view(np.uint16).astype(np.uint32)
    if bits.shape[1] % 2:
        bits = np.pad(bits, ((0, 0), (0, 1)))
    return bits[:, 0::2] | (bits[:, 1::2] << np.uint32(16))


def unpack_halves(words: np.ndarray, count: int) -> np.ndarray:
    """The inverse of pack_halves, as float32: [N, W] -> [N, count]."""
    bits = np.stack([words & np.uint32(0xFFFF), words >> np.uint32(16)], axis=-1)
    halves = bits.reshape(words.shape[0], -1)[:, :count].astype(np.uint16)
    return halves.view(np.float16).astype(np.float32)


# -- packing: TIR --------------------------------------------------------------------------


def _u32(v: int):
    from tvm import tirx

    return tirx.const(v, U32)


def field(plane, n, k, bits: int):
    """Value k (uint32) of a row of pack_fields words."""
    from tvm import tirx

    per = 32 // bits
    shift = tirx.Cast(U32, k % per) * _u32(bits)
    return (plane[n, k // per] >> shift) & _u32((1 << bits) - 1)


def high_field(plane, n, k, bits: int, per_low: int):
    """Value k (uint32) of a row of pack_high words."""
    from tvm import tirx

    per_word = 32 // bits
    j, f = k // per_low, k % per_low
    shift = tirx.Cast(U32, j % per_word) * _u32(bits)
    return (plane[n, j // per_word * per_low + f] >> shift) & _u32((1 << bits) - 1)


def half_to_float(bits):
    """A float16, given as the low 16 bits of a uint32 expression, as float32 (exactly).

    Integer operations and a bit cast only, so that targets without 16-bit floats (WGSL
    without shader-f16, OpenCL without cl_khr_fp16) read half-precision scales.
    """
    from tvm import tirx

    sign = bits >> _u32(15)
    exponent = (bits >> _u32(10)) & _u32(31)
    mantissa = bits & _u32(1023)
    # normal numbers (and inf/nan, which weights do not hold): rebias the exponent 15 -> 127
    normal = tirx.reinterpret(
        F32, (sign << _u32(31)) | ((exponent + _u32(112)) << _u32(23)) | (mantissa << _u32(13))
    )
    tiny = mantissa.astype(F32) * exact_f32(2.0**-24)  # subnormal halves: exact
    tiny = tirx.Select(sign == _u32(1), -tiny, tiny)
    return tirx.Select(exponent == _u32(0), tiny, normal)


def exact_f32(value: float):
    """A float32 constant as its bits: WGSL, OpenCL C and MSL print constants with 7
    significant digits, which 2**-24 does not survive."""
    from tvm import tirx

    bits = int(np.array(value, np.float32).view(np.uint32))
    return tirx.reinterpret(F32, _u32(bits))


def half(plane, n, i):
    """Half i (as float32) of a row of pack_halves words."""
    from tvm import tirx

    shift = tirx.Cast(U32, i % 2) * _u32(16)
    return half_to_float((plane[n, i // 2] >> shift) & _u32(0xFFFF))


def half_pair(plane, n, j):
    """The two halves of word j of a row (low, then high), as float32."""
    word = plane[n, j]
    return half_to_float(word & _u32(0xFFFF)), half_to_float(word >> _u32(16))


def byte(plane, n, i):
    """Byte i (uint32) of a row of uint32 words, little-endian."""
    return field(plane, n, i, 8)


# -- formats -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """A quantized format's formula for one row n, as CPU schedules take it apart:
    w[n, k] = q(k) * scale(g) + bias(g), g = k // group, with q = low | high << low_bits:
    `low` packs low_bits per value (pack_fields), `high` (if any) the high_bits above them
    (pack_high).
    Symmetric formats give `offset` instead of a bias: w = (q - offset) * scale."""

    low: Any  # te.Tensor of words
    low_bits: int
    high: Any | None
    high_bits: int
    group: int
    scale: Callable[[Any, Any], Any]  # (n, g) -> float32 expression
    bias: Callable[[Any, Any], Any] | None = None
    offset: int = 0

    def q(self, n, k):
        """The value q(k) of row n, as uint32."""
        q = field(self.low, n, k, self.low_bits)
        if self.high is not None:
            high = high_field(self.high, n, k, self.high_bits, 32 // self.low_bits)
            q = q | (high << _u32(self.low_bits))
        return q

    def weight(self, n, k):
        """w[n, k] in float32, computed as gguf's own dequantization computes it: products
        of a small integer and a half-precision scale are exact in float32, so one rounding
        at most, whatever the order."""
        from tvm import tirx

        g = k // self.group
        q = self.q(n, k).astype(F32)
        if self.bias is not None:
            return q * self.scale(n, g) + self.bias(n, g)
        return (q - tirx.const(self.offset, F32)) * self.scale(n, g)


class WeightFormat:
    """How a weight tensor is stored and read. Subclasses set `name` and implement the hooks."""

    name: str = "?"
    quantized: bool = True  # read through a dequantization (else plain floats)

    def planes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        """plane name -> (shape, dtype) of the arrays a weight of `shape` is stored in."""
        raise NotImplementedError

    def plane_names(self) -> tuple[str, ...]:
        """The names of the planes, whatever the shape."""
        raise NotImplementedError

    def affine(self, t: Mapping[str, Any]) -> Affine:
        """The formula over the planes' TE tensors `t` (quantized formats)."""
        raise NotImplementedError(f"{self.name} has no affine formula")

    def weight(self, t: Mapping[str, Any]) -> Callable[..., Any]:
        """(n, k) -> element (n, k) as float32, read from the planes' TE tensors `t`."""
        return self.affine(t).weight

    def dequantize(self, planes: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float32 tensor the planes hold, exactly as the kernels read it."""
        raise NotImplementedError

    def encode(self, source: Any, importance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The planes of a source tensor (`tapml.source.SourceTensor`)."""
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.planes(shape).values())

    def __repr__(self) -> str:
        return self.name


class Float(WeightFormat):
    """Plain floats in one plane, `weight` (norms, biases, and unquantized matrices)."""

    quantized = False

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.name = dtype

    def planes(self, shape):
        return {"weight": (tuple(shape), self.dtype)}

    def plane_names(self):
        return ("weight",)

    def weight(self, t):
        return lambda *i: t["weight"][i].astype(F32)

    def dequantize(self, planes):
        return np.asarray(planes["weight"], np.float32)

    def encode(self, source, importance=None):
        return {"weight": source.float32().astype(self.dtype)}

    def __eq__(self, other) -> bool:
        return isinstance(other, Float) and other.dtype == self.dtype

    def __hash__(self) -> int:
        return hash(("Float", self.dtype))


FLOAT32, FLOAT16 = Float("float32"), Float("float16")


def check_matrix(fmt: WeightFormat, shape: tuple[int, ...], multiple: int) -> tuple[int, int]:
    if len(shape) != 2 or shape[1] % multiple:
        raise TapmlError(
            f"{fmt.name} stores matrices whose rows are a multiple of {multiple} long, "
            f"not a tensor of shape {list(shape)}"
        )
    return int(shape[0]), int(shape[1])


class GroupQ4(WeightFormat):
    """tapml's own 4-bit format: symmetric groups of 32 (codes 0..15 stand for -7..8 steps),
    eight codes per uint32 (`q_weight` [N, K/8]) and one scale per group (`q_scale`
    [N, K/32], float32 or float16). Made by `quantize`, from float weights."""

    group = 32
    bits = 4
    offset = 7

    def __init__(self, scale_dtype: str):
        self.dtype = scale_dtype
        self.name = f"q4f{scale_dtype[-2:]}_1"

    def planes(self, shape):
        n, k = check_matrix(self, shape, self.group)
        return {"q_weight": ((n, k // 8), U32), "q_scale": ((n, k // self.group), self.dtype)}

    def plane_names(self):
        return ("q_weight", "q_scale")

    def affine(self, t):
        return Affine(t["q_weight"], self.bits, None, 0, self.group,
                      lambda n, g: t["q_scale"][n, g].astype(F32), offset=self.offset)  # fmt: skip

    def dequantize(self, planes):
        q = unpack_fields(planes["q_weight"], self.bits).astype(np.float32) - self.offset
        return q * np.repeat(planes["q_scale"].astype(np.float32), self.group, axis=1)

    def encode(self, source, importance=None):
        words, scale = self.quantize(source.float32(), importance)
        return {"q_weight": words, "q_scale": scale}

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """[N, K] float weights -> (uint32 words [N, K/8], scales [N, K/32]).

        Each group's scale minimizes the squared error weighted by `importance` (one value per
        input channel, e.g. the mean squared activation it sees; uniform when None): a few
        candidate scales around the group's signed peak are each refined by least squares.
        Using the signed peak lets it reach the code 15 (+8 steps), so all 16 codes serve.
        """
        n, k = check_matrix(self, w.shape, self.group)
        g = self.group
        groups = w.astype(np.float32).reshape(n, k // g, g)
        if importance is None:
            weight = np.ones((1, 1, g), np.float32)
        else:
            imp = np.asarray(importance, np.float32).reshape(1, k // g, -1)
            weight = imp / max(float(imp.mean()), 1e-30) + 1e-3  # no channel counts for nothing
        peak = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], axis=-1)
        zero = peak == 0
        peak = np.where(zero, 1.0, peak)
        best_scale, best_error = peak / self.offset, None
        top = 2**self.bits - 1
        for divisor in _SCALE_DIVISORS:
            scale = peak / divisor
            codes = np.clip(np.round(groups / scale) + self.offset, 0, top) - self.offset
            num = (weight * groups * codes).sum(-1, keepdims=True)
            den = (weight * codes * codes).sum(-1, keepdims=True)
            scale = np.where(den > 0, num / np.maximum(den, 1e-30), scale)
            scale = np.where(scale == 0, peak / divisor, scale)
            codes = np.clip(np.round(groups / scale) + self.offset, 0, top) - self.offset
            error = (weight * (groups - codes * scale) ** 2).sum(-1, keepdims=True)
            if best_error is None:
                best_scale, best_error = scale, error
            else:
                better = error < best_error
                best_scale = np.where(better, scale, best_scale)
                best_error = np.where(better, error, best_error)
        scale = np.where(zero, 0.0, best_scale).astype(self.dtype)
        s = scale.astype(np.float32)
        safe = np.where(s == 0, 1.0, s)
        q = np.clip(np.round(groups / safe) + self.offset, 0, top)
        q = np.where(s == 0, self.offset, q).astype(np.uint32).reshape(n, k)
        return pack_fields(q, self.bits), scale[..., 0]

    def __eq__(self, other) -> bool:
        return isinstance(other, GroupQ4) and other.dtype == self.dtype

    def __hash__(self) -> int:
        return hash(("GroupQ4", self.dtype))


# Candidate scales are the group's signed peak divided by these (8 lets the peak take code 15).
_SCALE_DIVISORS = (6.5, 7.0, 7.5, 8.0, 8.5, 9.0)
