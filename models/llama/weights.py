"""GGUF tensor names -> tapml's weight names for the Llama architecture.

GGUF stores Q and K projections already permuted for RoPE over adjacent pairs (llama.cpp's
convention), which is the layout the tapml model uses, so no permutation is needed.
"""

from __future__ import annotations

from .config import LlamaConfig

_NORMS = ("norm", "input_layernorm", "post_attention_layernorm")
_LAYER = {
    "input_layernorm": ["attn_norm"],
    # tapml's fused projections: GGUF matrices stacked by rows, in this order
    "self_attn.qkv_proj": ["attn_q", "attn_k", "attn_v"],
    "self_attn.o_proj": ["attn_output"],
    "post_attention_layernorm": ["ffn_norm"],
    "mlp.gate_up_proj": ["ffn_gate", "ffn_up"],
    "mlp.down_proj": ["ffn_down"],
}


def weight_map(config: LlamaConfig) -> dict[str, list[str]]:
    """tapml's weight names (planes left out) -> the GGUF tensors each is made of, stacked by
    rows in that order."""
    names = {"embed_tokens": ["token_embd.weight"], "norm": ["output_norm.weight"]}
    if not config.tie_word_embeddings:
        names["lm_head"] = ["output.weight"]
    for i in range(config.num_layers):
        for ours, theirs in _LAYER.items():
            names[f"layers.{i}.{ours}"] = [f"blk.{i}.{t}.weight" for t in theirs]
    return names


def matrix_parts(config: LlamaConfig) -> dict[str, int]:
    """Each matrix's number of stacked parts (the norms, vectors, left out)."""
    return {name: len(parts) for name, parts in weight_map(config).items()
            if name.rsplit(".", 1)[-1] not in _NORMS}  # fmt: skip
