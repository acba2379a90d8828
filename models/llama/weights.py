"""GGUF tensor names -> tapml's weight names for the Llama architecture.

llama.cpp's llama GGUFs store Q and K projections already permuted for RoPE over adjacent
pairs, and its Qwen2 GGUFs unpermuted for RoPE over halves: the model rotates as the config's
`rope_pairs` says, so no permutation is needed.
"""

from __future__ import annotations

from ..architecture import WeightMap
from .config import LlamaConfig

# tapml's fused projections: GGUF matrices stacked by rows, in this order
_MATRICES = {
    "self_attn.qkv_proj": ["attn_q", "attn_k", "attn_v"],
    "self_attn.o_proj": ["attn_output"],
    "mlp.gate_up_proj": ["ffn_gate", "ffn_up"],
    "mlp.down_proj": ["ffn_down"],
}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def weight_map(config: LlamaConfig) -> WeightMap:
    matrices = {"embed_tokens": ["token_embd.weight"]}
    if not config.tie_word_embeddings:
        matrices["lm_head"] = ["output.weight"]
    vectors = {"norm.weight": ["output_norm.weight"]}
    for i in range(config.num_layers):
        for ours, theirs in _MATRICES.items():
            matrices[f"layers.{i}.{ours}"] = [f"blk.{i}.{t}.weight" for t in theirs]
        for ours, theirs in _NORMS.items():
            vectors[f"layers.{i}.{ours}.weight"] = [f"blk.{i}.{theirs}.weight"]
        if config.attention_bias:
            qkv = _MATRICES["self_attn.qkv_proj"]
            vectors[f"layers.{i}.self_attn.qkv_proj.bias"] = [f"blk.{i}.{t}.bias" for t in qkv]
    return WeightMap(matrices, vectors)
