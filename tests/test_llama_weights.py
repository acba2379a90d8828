"""GGUF tensors -> the Llama model's weights: names, and the fused projections' stacking."""

import numpy as np

from tapml.convert import float_weights, gguf_sources
from tapml.gguf import GGUFFile
from tapml.models.llama.config import LlamaConfig
from tapml.models.llama.weights import matrix_parts, weight_map


def test_projections_are_stacked_by_rows_in_order(tiny_gguf):
    g = GGUFFile(tiny_gguf)
    config = LlamaConfig.from_gguf(g.metadata, g.tensor_names())
    weights = float_weights(gguf_sources(g, weight_map(config)))
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


def test_matrices_are_every_weight_but_the_norms(tiny_gguf):
    g = GGUFFile(tiny_gguf)
    config = LlamaConfig.from_gguf(g.metadata, g.tensor_names())
    parts = matrix_parts(config)
    assert parts["layers.1.self_attn.qkv_proj"] == 3 and parts["embed_tokens"] == 1
    vectors = set(weight_map(config)) - set(parts)
    assert vectors == {"norm"} | {f"layers.{i}.{n}" for i in range(2)
                                  for n in ("input_layernorm", "post_attention_layernorm")}
