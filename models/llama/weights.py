"""GGUF tensor names -> tapml's weight names for the Llama architecture.

GGUF stores Q and K projections already permuted for RoPE over adjacent pairs (llama.cpp's
convention), which is the layout the tapml model uses, so no permutation is needed.
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
    return WeightMap(matrices, vectors)
