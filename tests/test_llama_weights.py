"""GGUF tensors -> the Llama model's parameters: names, and the fused projections' stacking."""

import numpy as np
import pytest

from tapml.errors import WeightsError
from tapml.gguf import GGUFFile
from tapml.models.llama.weights import gguf_weights


class FakeGGUF:
    """The two methods gguf_weights reads, over a dict of arrays."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def tensor(self, name: str) -> np.ndarray:
        return self.tensors[name]


def test_projections_are_stacked_by_rows_in_order(tiny_gguf):
    g = GGUFFile(tiny_gguf)
    weights = dict(gguf_weights(g))
    for i in range(2):
        qkv = [g.tensor(f"blk.{i}.attn_{p}.weight") for p in "qkv"]
        gate_up = [g.tensor(f"blk.{i}.ffn_{p}.weight") for p in ("gate", "up")]
        np.testing.assert_array_equal(weights[f"layers.{i}.self_attn.qkv_proj.weight"],
                                      np.concatenate(qkv))  # fmt: skip
        np.testing.assert_array_equal(weights[f"layers.{i}.mlp.gate_up_proj.weight"],
                                      np.concatenate(gate_up))  # fmt: skip
        np.testing.assert_array_equal(weights[f"layers.{i}.self_attn.o_proj.weight"],
                                      g.tensor(f"blk.{i}.attn_output.weight"))  # fmt: skip
    layer = {n.removeprefix("layers.0.") for n in weights if n.startswith("layers.0.")}
    assert layer == {"input_layernorm.weight", "self_attn.qkv_proj.weight",
                     "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                     "mlp.gate_up_proj.weight", "mlp.down_proj.weight"}  # fmt: skip


def test_parts_in_any_order_stack_the_same():
    rows = {p: np.full((2, 4), i, np.float32) for i, p in enumerate("qkv")}
    shuffled = FakeGGUF({f"blk.0.attn_{p}.weight": rows[p] for p in "vqk"})
    (name, stacked), = gguf_weights(shuffled)
    assert name == "layers.0.self_attn.qkv_proj.weight"
    np.testing.assert_array_equal(stacked[:, 0], [0, 0, 1, 1, 2, 2])


def test_a_missing_part_is_named():
    g = FakeGGUF({"blk.3.ffn_gate.weight": np.zeros((2, 4), np.float32)})
    with pytest.raises(WeightsError, match="layers.3.mlp.gate_up_proj"):
        dict(gguf_weights(g))
