"""GGUF tensor names -> TinyQK's weights."""

from __future__ import annotations

from tapml.models.architecture import WeightMap

from .config import TinyQKConfig


def weight_map(config: TinyQKConfig) -> WeightMap:
    matrices = {"embed_tokens": ["token_embd.weight"]}
    vectors = {"norm.weight": ["output_norm.weight"]}
    for i in range(config.num_layers):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        matrices[ours + "qkv_proj"] = [blk + f"attn_{p}.weight" for p in "qkv"]
        matrices[ours + "o_proj"] = [blk + "attn_output.weight"]
        matrices[ours + "gate_up_proj"] = [blk + "ffn_gate.weight", blk + "ffn_up.weight"]
        matrices[ours + "down_proj"] = [blk + "ffn_down.weight"]
        vectors[ours + "qkv_proj.bias"] = [blk + f"attn_{p}.bias" for p in "qkv"]
        vectors[ours + "q_norm.weight"] = [blk + "attn_q_norm.weight"]
        vectors[ours + "k_norm.weight"] = [blk + "attn_k_norm.weight"]
        vectors[ours + "attn_norm.weight"] = [blk + "attn_norm.weight"]
        vectors[ours + "ffn_norm.weight"] = [blk + "ffn_norm.weight"]
    return WeightMap(matrices, vectors)
