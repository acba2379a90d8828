"""GGUF tensor names -> TinyQK's weights."""

from __future__ import annotations

from tapml.models.architecture import WeightMap

from .config import TinyQKConfig

_MATRICES = {
    "qkv_proj": ["attn_q", "attn_k", "attn_v"],
    "o_proj": ["attn_output"],
    "gate_up_proj": ["ffn_gate", "ffn_up"],
    "down_proj": ["ffn_down"],
}
_NORMS = {"q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "attn_norm": "attn_norm",
          "ffn_norm": "ffn_norm"}  # fmt: skip


def weight_map(config: TinyQKConfig) -> WeightMap:
    return WeightMap.gguf_layers(config.num_layers, _MATRICES, _NORMS, ["qkv_proj"])
