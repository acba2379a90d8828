"""A plain float64 numpy forward pass of Gemma-3, the reference compiled models are checked by."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..llama.reference import Weights, attention, rms_norm, rope
from .config import Gemma3Config


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def forward(
    weights: Mapping[str, np.ndarray],
    config: Gemma3Config,
    tokens: Sequence[int],
    observe: Callable[[str, np.ndarray], None] | None = None,
    kv_cache: str = "float64",
) -> np.ndarray:
    """Logits [len(tokens), vocab] (float64) of a causal forward pass from position 0; see
    `models.architecture.Architecture` for `observe` and `kv_cache`."""

    w = Weights(weights, observe, kv_cache)
    c = config
    t = len(tokens)
    x = w("embed_tokens.weight")[np.asarray(tokens)] * np.sqrt(c.hidden_size)
    for i in range(c.num_layers):
        p = f"layers.{i}."

        def norm(y: np.ndarray, name: str) -> np.ndarray:
            return rms_norm(y, w(p + name + ".weight"), c.rms_norm_eps)  # noqa: B023

        qkv = w.linear(norm(x, "input_layernorm"), p + "qkv_proj.weight").reshape(t, -1, c.head_dim)
        q, k, v = np.split(qkv, [c.num_heads, c.num_heads + c.num_kv_heads], axis=1)
        theta = c.layer_rope_theta(i)
        q = rope(norm(q, "q_norm"), theta, "halves")
        k = rope(norm(k, "k_norm"), theta, "halves")
        window = c.sliding_window if c.is_sliding(i) else None
        a = attention(q, w.cached(k), w.cached(v), window)
        x = x + norm(w.linear(a.reshape(t, -1), p + "o_proj.weight"), "post_attention_layernorm")
        h = norm(x, "pre_feedforward_layernorm")
        gate, up = np.split(w.linear(h, p + "gate_up_proj.weight"), 2, axis=1)
        m = w.linear(gelu_tanh(gate) * up, p + "down_proj.weight")
        x = x + norm(m, "post_feedforward_layernorm")
    x = rms_norm(x, w("norm.weight"), c.rms_norm_eps)
    return w.linear(x, "embed_tokens.weight")
