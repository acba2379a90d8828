"""TinyQK's numpy forward pass, float64: its judge."""

from __future__ import annotations

import numpy as np

from tapml.models.llama.reference import Weights, attention, rms_norm, rope, silu


def forward(weights, config, tokens, observe=None, kv_cache: str = "float64") -> np.ndarray:
    c, t, w = config, len(tokens), Weights(weights, observe, kv_cache)
    x = w("embed_tokens.weight")[np.asarray(tokens)]
    for i in range(c.num_layers):
        p = f"layers.{i}."
        h = rms_norm(x, w(p + "attn_norm.weight"), c.rms_norm_eps)
        qkv = w.linear(h, p + "qkv_proj.weight") + w(p + "qkv_proj.bias")
        qkv = qkv.reshape(t, -1, c.head_dim)
        q, k, v = np.split(qkv, [c.num_heads, c.num_heads + c.num_kv_heads], axis=1)
        q = rms_norm(q, w(p + "q_norm.weight"), c.rms_norm_eps)
        k = rms_norm(k, w(p + "k_norm.weight"), c.rms_norm_eps)
        a = attention(rope(q, c.rope_theta), w.cached(rope(k, c.rope_theta)), w.cached(v))
        x = x + w.linear(a.reshape(t, -1), p + "o_proj.weight")
        h = rms_norm(x, w(p + "ffn_norm.weight"), c.rms_norm_eps)
        gate, up = np.split(w.linear(h, p + "gate_up_proj.weight"), 2, axis=1)
        x = x + w.linear(silu(gate) * up, p + "down_proj.weight")
    return w.linear(rms_norm(x, w("norm.weight"), c.rms_norm_eps), "embed_tokens.weight")
