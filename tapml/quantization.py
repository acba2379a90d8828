"""Quantization schemes by name: how weights are stored and how kernels read them.

`q{bits}f{act}`: q0 keeps weights in the activation dtype; q4 is 4-bit symmetric group
quantization (group 32, eight 4-bit values per uint32, NK layout: [out, in/8] words and
[out, in/32] scales), dequantized inside the matmul kernel that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import TapmlError


@dataclass(frozen=True)
class Quantization:
    name: str
    dtype: str  # activation dtype, and the dtype of unquantized weights and of the scales
    bits: int = 0  # 0: weights are not quantized
    group_size: int = 32

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def quantize(
        self, w: np.ndarray, importance: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """[N, K] float weights -> (uint32 words [N, K/8], scales [N, K/32]).

        Each group's scale minimizes the squared error weighted by `importance` (one value per
        input channel, e.g. the mean squared activation it sees; uniform when None): a few
        candidate scales around the group's signed peak are each refined by least squares.
        Using the signed peak lets it reach the code 15 (+8 steps), so all 16 codes serve.
        """
        n, k = w.shape
        if k % self.group_size:
            raise TapmlError(
                f"{self.name} needs the input dimension to be a multiple of {self.group_size}, "
                f"got a [{n}, {k}] weight"
            )
        groups = w.astype(np.float32).reshape(n, k // self.group_size, self.group_size)
        if importance is None:
            weight = np.ones((1, 1, self.group_size), np.float32)
        else:
            imp = np.asarray(importance, np.float32).reshape(1, k // self.group_size, -1)
            weight = imp / max(float(imp.mean()), 1e-30) + 1e-3  # no channel counts for nothing
        peak = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], axis=-1)
        zero = peak == 0
        peak = np.where(zero, 1.0, peak)
        best_scale, best_error = peak / self.max_int, None
        top = 2**self.bits - 1
        for divisor in _SCALE_DIVISORS:
            scale = peak / divisor
            codes = np.clip(np.round(groups / scale) + self.max_int, 0, top) - self.max_int
            num = (weight * groups * codes).sum(-1, keepdims=True)
            den = (weight * codes * codes).sum(-1, keepdims=True)
            scale = np.where(den > 0, num / np.maximum(den, 1e-30), scale)
            scale = np.where(scale == 0, peak / divisor, scale)
            codes = np.clip(np.round(groups / scale) + self.max_int, 0, top) - self.max_int
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
        q = np.clip(np.round(groups / safe) + self.max_int, 0, top)
        q = np.where(s == 0, self.max_int, q).astype(np.uint32)
        q = q.reshape(n, k // self.per_word, self.per_word)
        shifts = np.arange(self.per_word, dtype=np.uint32) * np.uint32(self.bits)
        words = np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)
        return words, scale[..., 0]

    def dequantize(self, words: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The float32 weights [N, K] that the kernels compute with."""
        n = words.shape[0]
        shifts = np.arange(self.per_word, dtype=np.uint32) * np.uint32(self.bits)
        q = (words[..., None] >> shifts) & np.uint32(2**self.bits - 1)
        q = q.reshape(n, -1).astype(np.float32) - self.max_int
        return q * np.repeat(scale.astype(np.float32), self.group_size, axis=1)


# Candidate scales are the group's signed peak divided by these (8 lets the peak take code 15).
_SCALE_DIVISORS = (6.5, 7.0, 7.5, 8.0, 8.5, 9.0)

QUANTIZATION: dict[str, Quantization] = {
    q.name: q
    for q in [
        Quantization("q0f32", "float32"),
        Quantization("q0f16", "float16"),
        Quantization("q4f32_1", "float32", bits=4),
        Quantization("q4f16_1", "float16", bits=4),
    ]
}


def get_quantization(name: str) -> Quantization:
    if name not in QUANTIZATION:
        raise TapmlError(f"unknown quantization {name!r}; choose one of: {', '.join(QUANTIZATION)}")
    return QUANTIZATION[name]


def dequantize_params(params: dict[str, np.ndarray], quant: Quantization) -> dict[str, np.ndarray]:
    """The float32 weights, under their unquantized names, that a model's kernels compute with.

    The independent numpy forward pass runs on these, so it sees exactly the values the
    compiled kernels see (quantization error included).
    """
    out = {}
    for name, value in params.items():
        if name.endswith(".q_weight"):
            base = name.removesuffix(".q_weight")
            out[f"{base}.weight"] = quant.dequantize(value, params[f"{base}.q_scale"])
        elif not name.endswith(".q_scale"):
            out[name] = np.asarray(value, dtype=np.float32)
    return out
