"""GGUF's block formats kept as stored: each block's values re-laid out, losslessly, into
planes of uint32 words that every target reads (see tapml.formats).

A GGUF block interleaves half-precision scales, packed scale bytes and 4-bit values in an
order chosen for llama.cpp's kernels. Here every value moves to its k-ordered field in
`q_weight` (the low 4 or 8 bits) and `q_high` (the bits above them, laid out for vectors of
low words: `tapml.formats.pack_high`), scales to `q_scale`
(per group) and `q_super` (per 256-value super-block), as halves or bytes in words. The
float32 value of every element is then exactly gguf's own dequantization
(`gguf.quants.dequantize`): each product of a small integer and a half-precision scale is
exact in float32, and the one addition rounds as gguf's does. The stored size grows by at
most 1/8 bit per weight (K-quants' packed 6-bit scales take whole bytes), plus half a word
per row where a row has an odd number of half-precision scales, and Q5_0's high bits a block
of 256 values per row where a row is not whole blocks (0.14 bit per weight at K = 896).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .errors import TapmlError
from .formats import (
    F32,
    U32,
    Affine,
    WeightFormat,
    byte,
    check_matrix,
    half,
    half_pair,
    high_words,
    pack_fields,
    pack_halves,
    pack_high,
    unpack_fields,
    unpack_halves,
    unpack_high,
)


class GGUFBlocks(WeightFormat):
    """A GGUF quantization type kept as stored. Subclasses give the block layout (`_split`:
    raw blocks -> values and scales, following gguf's own dequantization) and the scales'
    formula over the planes, in TIR (`affine`) and numpy (`_scale_bias`)."""

    ggml: ClassVar[str]
    block: ClassVar[int]  # values per GGUF block
    type_size: ClassVar[int]  # bytes per GGUF block
    group: ClassVar[int]  # values sharing one scale
    low_bits: ClassVar[int] = 4
    high_bits: ClassVar[int] = 0
    offset: ClassVar[int] = 0  # symmetric formats: w = (q - offset) * scale

    @property
    def name(self) -> str:
        return self.ggml

    @property
    def per_low(self) -> int:
        """Values per low word."""
        return 32 // self.low_bits

    def planes(self, shape):
        n, k = check_matrix(self, shape, self.block)
        planes = {"q_weight": ((n, k * self.low_bits // 32), U32)}
        if self.high_bits:
            planes["q_high"] = ((n, high_words(k, self.high_bits, self.per_low)), U32)
        planes.update(self._scale_planes(n, k // self.block))
        return planes

    def plane_names(self):
        return ("q_weight", *(("q_high",) if self.high_bits else ()), *self._scale_planes(1, 1))

    def encode(self, source, importance=None):
        if source.stored != self.ggml:
            raise TapmlError(f"{source.name} is stored as {source.stored}, not {self.ggml}")
        n, k = check_matrix(self, source.shape, self.block)
        blocks = source.raw().reshape(n, k // self.block, self.type_size)
        values, scales = self._split(blocks)
        values = values.reshape(n, k)
        planes = {"q_weight": pack_fields(values & ((1 << self.low_bits) - 1), self.low_bits)}
        if self.high_bits:
            planes["q_high"] = pack_high(values >> self.low_bits, self.high_bits, self.per_low)
        return {**planes, **scales}

    def dequantize(self, planes):
        q = unpack_fields(planes["q_weight"], self.low_bits)
        if self.high_bits:
            high = unpack_high(planes["q_high"], self.high_bits, self.per_low, q.shape[1])
            q = q | (high << np.uint32(self.low_bits))
        q = q.astype(np.float32)
        n, k = q.shape
        scale, bias = self._scale_bias(planes, n, k // self.group)
        scale = np.repeat(scale, self.group, axis=1)
        if bias is None:
            return (q - np.float32(self.offset)) * scale
        return q * scale + np.repeat(bias, self.group, axis=1)

    def _affine(self, t, scale, bias=None) -> Affine:
        return Affine(t["q_weight"], self.low_bits, t.get("q_high"), self.high_bits, self.group,
                      scale, bias, self.offset)  # fmt: skip

    # -- hooks ------------------------------------------------------------------------
    def _scale_planes(self, n: int, blocks: int) -> dict:
        raise NotImplementedError

    def _split(self, blocks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Raw blocks [N, B, type_size] -> (values [N, B, block] as uint8, scale planes)."""
        raise NotImplementedError

    def _scale_bias(self, planes, n: int, groups: int):
        """(scale, bias or None) per group, float32 [N, groups], as the kernels compute them."""
        raise NotImplementedError


def _halves(raw: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float16."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., m] bytes -> [..., 2m] values: the low nibbles, then the high ones (gguf's order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


class _OneScale(GGUFBlocks):
    """Blocks of 32 with one half-precision scale each: Q4_0, Q5_0, Q8_0."""

    block = group = 32

    def _scale_planes(self, n, blocks):
        return {"q_scale": ((n, -(-blocks // 2)), U32)}

    def affine(self, t):
        return self._affine(t, lambda n, g: half(t["q_scale"], n, g))

    def _scale_bias(self, planes, n, groups):
        return unpack_halves(planes["q_scale"], groups), None


class Q4_0(_OneScale):
    ggml, type_size, offset = "Q4_0", 18, 8

    def _split(self, blocks):
        n, b, _ = blocks.shape
        return _nibbles(blocks[..., 2:]), {"q_scale": pack_halves(_halves(blocks[..., :2]))}


class Q5_0(_OneScale):
    ggml, type_size, offset, high_bits = "Q5_0", 22, 16, 1

    def _split(self, blocks):
        high = np.ascontiguousarray(blocks[..., 2:6]).view(np.uint32)  # bit j: value j's 5th
        bits = (high >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
        values = _nibbles(blocks[..., 6:]) | (bits.astype(np.uint8) << 4)
        return values, {"q_scale": pack_halves(_halves(blocks[..., :2]))}


class Q8_0(_OneScale):
    """Signed bytes, stored biased by 128 so that every format's fields are unsigned."""

    ggml, type_size, offset, low_bits = "Q8_0", 34, 128, 8

    def _split(self, blocks):
        values = blocks[..., 2:] ^ np.uint8(0x80)  # int8 q -> q + 128
        return values, {"q_scale": pack_halves(_halves(blocks[..., :2]))}


class Q4_1(GGUFBlocks):
    """Blocks of 32 with a half-precision scale and minimum: w = q * d + m."""

    ggml, block, group, type_size = "Q4_1", 32, 32, 20

    def _scale_planes(self, n, blocks):
        return {"q_scale": ((n, blocks), U32)}  # (d, m) in the low and high halves

    def _split(self, blocks):
        dm = np.ascontiguousarray(blocks[..., :4]).view(np.float16)  # [N, B, 2]
        return _nibbles(blocks[..., 4:]), {"q_scale": pack_halves(dm.reshape(dm.shape[0], -1))}

    def affine(self, t):
        s = t["q_scale"]
        return self._affine(t, lambda n, g: half_pair(s, n, g)[0],
                            lambda n, g: half_pair(s, n, g)[1])  # fmt: skip

    def _scale_bias(self, planes, n, groups):
        dm = unpack_halves(planes["q_scale"], 2 * groups)
        return dm[:, 0::2], dm[:, 1::2]


class _KQuant(GGUFBlocks):
    """Super-blocks of 256 in 8 groups of 32: w = q * (d * sc) - dmin * m, with 6-bit sc and
    m per group, re-packed one per byte (`q_scale`: sc and m of group g in bytes 2g and
    2g + 1, so that one word read serves both), and the half-precision d and dmin of each
    super-block in one word (`q_super`)."""

    block, group = 256, 32

    def _scale_planes(self, n, blocks):
        return {"q_scale": ((n, 4 * blocks), U32), "q_super": ((n, blocks), U32)}

    def _scales(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        from gguf.quants import Q4_K as GGUFQ4K

        n, b, _ = blocks.shape
        sc, m = GGUFQ4K.get_scale_min(blocks[..., 4:16].reshape(n * b, 12))
        scale_bytes = np.stack([sc, m], axis=-1).reshape(n, b * 16)
        d_dmin = np.ascontiguousarray(blocks[..., :4]).view(np.float16).reshape(n, 2 * b)
        return {"q_scale": scale_bytes.view(np.uint32), "q_super": pack_halves(d_dmin)}

    @staticmethod
    def _low(qs: np.ndarray) -> np.ndarray:
        """128 bytes per super-block -> 256 values: each 32 bytes hold two groups, the low
        nibbles first."""
        n, b, _ = qs.shape
        chunks = qs.reshape(n, b, 4, 32)
        return np.concatenate([chunks & 15, chunks >> 4], axis=-1).reshape(n, b, 256)

    def affine(self, t):
        from tvm import tirx

        sc, sup = t["q_scale"], t["q_super"]

        def scale_bytes(n, g):
            """Group g's sc and m: bytes 2g and 2g + 1 of the row, in word g // 2."""
            word = sc[n, g // 2] >> (g % 2).astype(U32) * tirx.const(16, U32)
            return [(word >> tirx.const(at, U32)) & tirx.const(255, U32) for at in (0, 8)]

        def scale(n, g):
            return half_pair(sup, n, g // 8)[0] * scale_bytes(n, g)[0].astype(F32)

        def bias(n, g):
            return -(half_pair(sup, n, g // 8)[1] * scale_bytes(n, g)[1].astype(F32))

        return self._affine(t, scale, bias)

    def _scale_bias(self, planes, n, groups):
        blocks = groups // 8
        d_dmin = unpack_halves(planes["q_super"], 2 * blocks)
        scale_bytes = planes["q_scale"].view(np.uint8).reshape(n, blocks, 8, 2).astype(np.float32)
        d, dmin = d_dmin[:, 0::2, None], d_dmin[:, 1::2, None]
        scale = (d * scale_bytes[..., 0]).reshape(n, groups)
        bias = -(dmin * scale_bytes[..., 1]).reshape(n, groups)
        return scale, bias


class Q4_K(_KQuant):
    ggml, type_size = "Q4_K", 144

    def _split(self, blocks):
        return self._low(blocks[..., 16:]), self._scales(blocks)


class Q5_K(_KQuant):
    ggml, type_size, high_bits = "Q5_K", 176, 1

    def _split(self, blocks):
        n, b, _ = blocks.shape
        qh = blocks[..., 16:48]  # bit j of byte e: the 5th bit of value e of group j
        high = (qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
        values = self._low(blocks[..., 48:]) | (high.reshape(n, b, 256) << 4)
        return values, self._scales(blocks)


class Q6_K(GGUFBlocks):
    """Super-blocks of 256 in 16 groups of 16: w = (q - 32) * d * sc, with signed 8-bit sc
    per group (stored biased by 128 in `q_scale`) and a half-precision d per super-block
    (`q_super`); q is 4 low bits and 2 high bits."""

    ggml, block, group, type_size, offset, high_bits = "Q6_K", 256, 16, 210, 32, 2

    def _scale_planes(self, n, blocks):
        return {"q_scale": ((n, 4 * blocks), U32), "q_super": ((n, -(-blocks // 2)), U32)}

    def _split(self, blocks):
        n, b, _ = blocks.shape
        ql = blocks[..., :128].reshape(n, b, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]
        qh = blocks[..., 128:192].reshape(n, b, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[
            :, None
        ]
        values = (ql & 15).reshape(n, b, 256) | ((qh & 3).reshape(n, b, 256) << 4)
        scales = (blocks[..., 192:208] ^ np.uint8(0x80)).reshape(n, b * 16)
        d = _halves(blocks[..., 208:210])
        return values, {"q_scale": scales.view(np.uint32), "q_super": pack_halves(d)}

    def affine(self, t):
        sc, sup = t["q_scale"], t["q_super"]

        def scale(n, g):
            from tvm import tirx

            signed = byte(sc, n, g).astype(F32) - tirx.const(128, F32)
            return half(sup, n, g // 16) * signed

        return self._affine(t, scale)

    def _scale_bias(self, planes, n, groups):
        d = unpack_halves(planes["q_super"], groups // 16)
        signed = planes["q_scale"].view(np.uint8).astype(np.float32) - np.float32(128)
        return np.repeat(d, 16, axis=1) * signed, None


class F16(WeightFormat):
    """A float16 matrix kept as stored, two values per uint32 word (`q_halves`): read on
    targets without 16-bit floats too."""

    name = "F16"

    def planes(self, shape):
        n, k = check_matrix(self, shape, 2)
        return {"q_halves": ((n, k // 2), U32)}

    def plane_names(self):
        return ("q_halves",)

    def weight(self, t):
        return lambda n, k: half(t["q_halves"], n, k)

    def dequantize(self, planes):
        words = planes["q_halves"]
        return unpack_halves(words, words.shape[1] * 2)

    def encode(self, source, importance=None):
        return {"q_halves": pack_halves(source.float32().astype(np.float16))}


BLOCK_FORMATS: dict[str, WeightFormat] = {
    f.name: f for f in (Q4_0(), Q4_1(), Q5_0(), Q8_0(), Q4_K(), Q5_K(), Q6_K(), F16())
}
