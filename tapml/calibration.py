"""Activation statistics that steer 4-bit quantization toward the weights that matter.

The float model runs (numpy reference) over a short, varied calibration text; each matrix's
input channels are weighted by the mean squared activation they saw, so quantization spends
its precision where the products are large (the idea behind llama.cpp's importance matrix).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

# Varied on purpose (prose, code, numbers, other languages, a chat turn); it deliberately
# shares no facts with the prompts tests check.
CALIBRATION_TEXT = (
    "Rivers carry water from the mountains to the sea, shaping valleys over thousands of "
    "years. def mean(values):\n    return sum(values) / len(values)\n"
    "In 1969 astronauts walked on the Moon; the mission lasted eight days. "
    "Die Katze schläft auf dem Sofa, während es draußen regnet. 日本の首都は東京です。 "
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n"
    "<|im_start|>assistant\nCrimson leaves drifting"
)

Forward = Callable[..., np.ndarray]


def activation_importance(
    forward: Forward, weights: Mapping[str, np.ndarray], config, tokens: Sequence[int]
) -> dict[str, np.ndarray]:
    """Mean squared input activation per channel, for every weight matrix `forward` uses.

    `forward(weights, config, tokens, observe=...)` must call `observe(name, inputs)` before
    each product with the matrix `name`.
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: np.ndarray) -> None:
        sums[name] = sums.get(name, 0.0) + (x * x).sum(axis=0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    forward(weights, config, tokens, observe=observe)
    return {name: (sums[name] / counts[name]).astype(np.float32) for name in sums}
