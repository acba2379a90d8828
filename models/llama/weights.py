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
    biases = ["self_attn.qkv_proj"] if config.attention_bias else []
    return WeightMap.gguf_layers(config.num_layers, _MATRICES, _NORMS, biases,
                                 untied_output=not config.tie_word_embeddings)  # fmt: skip
