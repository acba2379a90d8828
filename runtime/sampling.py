"""Choosing the next token from logits."""

from __future__ import annotations

import numpy as np


def greedy(logits: np.ndarray) -> int:
    """The most likely token (the lowest id among ties, as llama.cpp's greedy sampler)."""
    return int(np.argmax(logits))
