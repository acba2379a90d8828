"""GGUF tensor names -> tapml's weight names for Gemma-3. The GGUF's norm weights already
hold Gemma's "1 +": they are used as they are."""

from __future__ import annotations

from ..architecture import WeightMap
from .config import Gemma3Config

_MATRICES = {
    "qkv_proj": ["attn_q", "attn_k", "attn_v"],
    "o_proj": ["attn_output"],
    "gate_up_proj": ["ffn_gate", "ffn_up"],
    "down_proj": ["ffn_down"],
}
_NORMS = {
    "input_layernorm": "attn_norm",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def weight_map(config: Gemma3Config) -> WeightMap:
    return WeightMap.gguf_layers(config.num_layers, _MATRICES, _NORMS)
