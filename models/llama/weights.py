"""GGUF tensor names -> tapml's parameter names for the Llama architecture."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from tapml.gguf import GGUFFile

_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def param_name(gguf_name: str) -> str | None:
    """tapml's name for a GGUF tensor, or None for tensors the model does not use."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


def gguf_weights(gguf: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """Every weight the model uses, float32, under tapml's names.

    GGUF stores Q and K projections already permuted for RoPE over adjacent pairs
    (llama.cpp's convention), which is the layout the tapml model uses, so no
    permutation is needed here.
    """
    for name in gguf.tensor_names():
        target = param_name(name)
        if target is not None:
            yield target, gguf.tensor(name)
