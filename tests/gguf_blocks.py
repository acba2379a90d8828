"""Random stored tensors of GGUF block types, for tests (gguf's own Python package quantizes
only some of them): random values and scale bytes, and half-precision scales chosen so that
the weights' magnitude is about `magnitude`."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# per block type: the byte offsets of its half-precision scales, and the largest value a
# scale of 1 gives (the largest |q| times the largest sub-scale)
LAYOUT = {
    "Q4_0": ([0], 8), "Q4_1": ([0, 2], 15), "Q5_0": ([0], 16), "Q8_0": ([0], 128),
    "Q4_K": ([0, 2], 63 * 15), "Q5_K": ([0, 2], 63 * 31), "Q6_K": ([208], 128 * 32),
}  # fmt: skip
BLOCK_TYPES = list(LAYOUT)


def random_blocks(kind: str, rows: int, cols: int, magnitude: float = 1.0, seed: int = 0
                  ) -> np.ndarray:  # fmt: skip
    """Stored rows [rows, bytes] of block type `kind`: finite halves (a subnormal and negative
    ones among them)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    offsets, peak = LAYOUT[kind]
    for i, at in enumerate(offsets):
        halves = magnitude / peak * rng.uniform(0.3, 1.0, (rows, cols // block))
        if i == 1:  # Q4_1's minimum, the K-quants' dmin: about half the range, as stored
            halves *= -peak / 2 if kind == "Q4_1" else peak / 63 / 2
        halves = halves.astype(np.float16)
        halves[0, 0] = np.float16(3e-7)  # subnormal
        raw[..., at : at + 2] = halves.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)
