"""tapml's 4-bit groups (q4f32_1, q4f16_1): the packed layout, dequantization against plain
numpy, and the scale search; the schemes' registry."""

import numpy as np
import pytest

from tapml.errors import TapmlError
from tapml.quantization import QUANTIZATION, get_quantization


def dequantize(quant, words: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return quant.dequantize({"q_weight": words, "q_scale": scale})


def unpack_by_hand(words: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Value j of row n is nibble j % 8 of word j // 8, minus 7, times scale[n, j // 32]."""
    n, k = words.shape[0], words.shape[1] * 8
    out = np.zeros((n, k), np.float32)
    for row in range(n):
        for j in range(k):
            nibble = (int(words[row, j // 8]) >> (4 * (j % 8))) & 0xF
            out[row, j] = (nibble - 7) * float(scale[row, j // 32])
    return out


@pytest.mark.parametrize("name", ["q4f32_1", "q4f16_1"])
def test_pack_layout_and_dequantize_match_numpy(name):
    quant = QUANTIZATION[name].matrix
    w = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    words, scale = quant.quantize(w)
    assert words.dtype == np.uint32 and words.shape == (5, 12)
    assert scale.dtype == np.dtype(quant.dtype) and scale.shape == (5, 3)
    np.testing.assert_array_equal(dequantize(quant, words, scale), unpack_by_hand(words, scale))


def max_over_7(w: np.ndarray) -> np.ndarray:
    """The plain rule (scale = max|w| / 7, codes 0..14), as numpy, for comparison."""
    g = w.reshape(w.shape[0], -1, 32)
    scale = np.abs(g).max(-1, keepdims=True) / 7
    return (np.clip(np.round(g / scale), -7, 7) * scale).reshape(w.shape)


def test_scale_search_beats_max_over_7():
    quant = QUANTIZATION["q4f32_1"].matrix
    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    words, scale = quant.quantize(w)
    ours = np.square(dequantize(quant, words, scale) - w).sum()
    assert ours < 0.9 * np.square(max_over_7(w) - w).sum()
    nibbles = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    assert nibbles.max() == 15  # the signed peak may take the 16th code


def test_importance_moves_precision_to_the_channels_that_matter():
    quant = QUANTIZATION["q4f32_1"].matrix
    w = np.random.default_rng(2).standard_normal((256, 64)).astype(np.float32)
    importance = np.ones(64, np.float32)
    importance[::4] = 100.0
    plain = dequantize(quant, *quant.quantize(w)) - w
    steered = dequantize(quant, *quant.quantize(w, importance)) - w
    weighted = lambda e: (importance * np.square(e)).sum()  # noqa: E731
    assert weighted(steered) < weighted(plain)
    assert np.square(steered[:, ::4]).sum() < np.square(plain[:, ::4]).sum()


def test_group_of_zeros_stays_zero():
    quant = QUANTIZATION["q4f32_1"].matrix
    w = np.zeros((2, 64), np.float32)
    w[1, 32:] = 1.0
    words, scale = quant.quantize(w)
    np.testing.assert_array_equal(dequantize(quant, words, scale), w)


def test_input_dimension_must_fill_groups():
    with pytest.raises(TapmlError, match="multiple of 32"):
        QUANTIZATION["q4f32_1"].matrix.quantize(np.ones((4, 40), np.float32))


def test_unknown_quantization_lists_the_valid_ones():
    with pytest.raises(TapmlError, match="gguf, q4f32_1, q4f16_1, q0f32, q0f16"):
        get_quantization("q3f8")
