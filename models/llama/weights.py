"""GGUF tensor names -> tapml's parameter names for the Llama architecture."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from tapml.errors import WeightsError
from tapml.gguf import GGUFFile

_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_down": "mlp.down_proj",
}
# tapml's fused projections: GGUF matrices stacked by rows, in this order
_FUSED = {
    "self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
}
_PART = {part: (fused, i) for fused, parts in _FUSED.items() for i, part in enumerate(parts)}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def param_name(gguf_name: str) -> str | None:
    """tapml's name for a GGUF tensor (of the matrix it is stacked into, for one part of a
    fused projection), or None for tensors the model does not use."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    if m and m.group(2) in _PART:
        return f"layers.{m.group(1)}.{_PART[m.group(2)][0]}.weight"
    return None


def gguf_weights(gguf: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """Every weight the model uses, float32, under tapml's names; the parts of a fused
    projection are stacked once all of them are read.

    GGUF stores Q and K projections already permuted for RoPE over adjacent pairs
    (llama.cpp's convention), which is the layout the tapml model uses, so no
    permutation is needed here.
    """
    pending: dict[str, dict[int, np.ndarray]] = {}  # fused name -> the parts read so far
    for name in gguf.tensor_names():
        target = param_name(name)
        m = _LAYER_RE.fullmatch(name)
        if target is None:
            continue
        if not (m and m.group(2) in _PART):
            yield target, gguf.tensor(name)
            continue
        fused, index = _PART[m.group(2)]
        parts = pending.setdefault(target, {})
        parts[index] = gguf.tensor(name)
        if len(parts) == len(_FUSED[fused]):
            yield target, np.concatenate([parts[i] for i in range(len(parts))])
            del pending[target]
    if pending:
        raise WeightsError(f"the GGUF lacks parts of fused projections: {sorted(pending)[:3]}")
