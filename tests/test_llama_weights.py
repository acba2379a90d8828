"""GGUF tensors -> the Llama model's weights: names, and the fused projections' stacking."""

import numpy as np

from tapml.compiler import load_model_file
from tapml.gguf import GGUFFile
from tapml.models import ARCHITECTURES
from tapml.models.llama.weights import weight_map


def test_projections_are_stacked_by_rows_in_order(tiny_gguf):
    g = GGUFFile(tiny_gguf)
    weights = load_model_file(tiny_gguf).float_weights()
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


def test_matrices_and_vectors(tiny_gguf):
    config = load_model_file(tiny_gguf).config
    parts = ARCHITECTURES["llama"].matrix_parts(config)
    assert parts["layers.1.self_attn.qkv_proj"] == 3 and parts["embed_tokens"] == 1
    assert set(weight_map(config).vectors) == {"norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2)
        for n in ("input_layernorm", "post_attention_layernorm")}  # fmt: skip
