"""Weights from a GGUF into the formats a plan reads: stacking, parts stored in different types,
missing tensors, and what the artifact's config says of its weights."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tapml.artifact import describe
from tapml.convert import bits_per_parameter, convert, file_sources, stored_types, weight_summary
from tapml.errors import WeightsError
from tapml.models.architecture import WeightMap
from tapml.quantization import QUANTIZATION, dequantize_params, format_names
from tapml.source import SourceTensor


class FakeGGUF:
    """What file_sources reads of a GGUF, over stored rows of given types."""

    path = "fake.gguf"

    def __init__(self, tensors: dict[str, tuple[str, np.ndarray]]):
        self.tensors = tensors

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def source(self, name: str) -> SourceTensor:
        kind, raw = self.tensors[name]
        floats = dequantize(raw, GGMLQuantizationType[kind])
        return SourceTensor(name, kind, floats.shape, lambda: raw, lambda: floats)


def stored(kind: str, rows: int, cols: int, value: float) -> tuple[str, np.ndarray]:
    floats = np.full((rows, cols), value, np.float32)
    floats[:, 1] = -value
    return kind, quantize(floats, GGMLQuantizationType[kind])


QKV = {"qkv": ["q", "k", "v"]}
QKV_MAP = WeightMap(QKV, {})


def test_parts_stack_in_the_maps_order_whatever_the_files():
    g = FakeGGUF({name: stored("Q8_0", 2, 32, value) for name, value in
                  (("v", 3.0), ("q", 1.0), ("k", 2.0))})  # fmt: skip
    sources = file_sources(g, QKV)
    assert stored_types(sources) == {"qkv": ("Q8_0", "Q8_0", "Q8_0")}
    quant = QUANTIZATION["gguf"]
    formats = quant.formats(stored_types(sources))
    params = dict(convert(sources, QKV_MAP, quant, formats))
    assert set(params) == {"qkv.q_weight", "qkv.q_scale"}  # one matrix, one matmul
    weight = dequantize_params(params, format_names(formats))["qkv.weight"]
    np.testing.assert_allclose(weight[:, 0], [1, 1, 2, 2, 3, 3], rtol=1e-3)
    want = np.concatenate([g.source(n).float32() for n in "qkv"])
    np.testing.assert_array_equal(weight, want)


def test_parts_stored_in_different_types_keep_their_own():
    g = FakeGGUF({"q": stored("Q8_0", 2, 32, 1.0), "k": stored("Q4_0", 2, 32, 2.0),
                  "v": stored("Q8_0", 2, 32, 3.0)})  # fmt: skip
    sources = file_sources(g, QKV)
    quant = QUANTIZATION["gguf"]
    formats = quant.formats(stored_types(sources))
    assert format_names(formats) == {"qkv": ["Q8_0", "Q4_0", "Q8_0"]}
    params = dict(convert(sources, QKV_MAP, quant, formats))
    assert {n.rsplit(".", 1)[0] for n in params} == {"qkv.parts.0", "qkv.parts.1", "qkv.parts.2"}
    weight = dequantize_params(params, format_names(formats))["qkv.weight"]
    want = np.concatenate([g.source(n).float32() for n in "qkv"])
    np.testing.assert_array_equal(weight, want)
    # re-quantizing schemes make every part alike: one matrix again
    requantized = QUANTIZATION["q4f32_1"].formats(stored_types(sources))
    assert set(dict(convert(sources, QKV_MAP, QUANTIZATION["q4f32_1"], requantized))) == {
        "qkv.q_weight", "qkv.q_scale"}  # fmt: skip


def test_a_missing_tensor_is_named_with_the_weight_it_makes():
    g = FakeGGUF({"q": stored("Q8_0", 2, 32, 1.0)})
    with pytest.raises(WeightsError, match=r"fake.gguf lacks 2 tensors.*k \(for qkv\)"):
        file_sources(g, QKV)


def test_the_summary_counts_matrices_parameters_and_bytes():
    g = FakeGGUF({"q": stored("Q8_0", 2, 64, 1.0), "k": stored("Q4_0", 4, 64, 2.0),
                  "v": stored("Q8_0", 2, 64, 3.0)})  # fmt: skip
    sources = file_sources(g, QKV)
    formats = QUANTIZATION["gguf"].formats(stored_types(sources))
    summary = weight_summary(sources, formats)
    assert summary["matrices"] == {"qkv": ["Q8_0", "Q4_0", "Q8_0"]}
    assert summary["formats"] == {
        "Q8_0": {"matrices": 2, "parameters": 256, "bytes": 4 * 68},  # 8.5 bits per weight
        "Q4_0": {"matrices": 1, "parameters": 256, "bytes": 4 * 36},  # 4.5
    }


def test_bits_per_parameter(tiny_artifact):
    # 4 bits per weight plus one scale per 32: f32 scales give 5 bits, f16 ones 4.5
    assert bits_per_parameter(describe(tiny_artifact("q4f32_1"))) == pytest.approx(5.0)
    assert bits_per_parameter(describe(tiny_artifact("q4f16_1", "opencl"))) == pytest.approx(4.5)
    assert bits_per_parameter(describe(tiny_artifact("q0f32"))) == pytest.approx(32)
