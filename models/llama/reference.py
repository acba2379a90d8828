"""A plain float64 numpy forward pass of Llama, the reference compiled models are checked by."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .config import LlamaConfig


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, theta: float, pairs: str = "adjacent") -> np.ndarray:
    """Rotate pair i by pos * theta^(-2i/d); x is [tokens, heads, d]. Pair i is
    (x[2i], x[2i+1]) for "adjacent" pairs, (x[i], x[i + d/2]) for "halves"."""
    tokens, _, d = x.shape
    freqs = theta ** (-np.arange(0, d, 2) / d)
    angle = np.arange(tokens)[:, None, None] * freqs  # [tokens, 1, d/2]
    cos, sin = np.cos(angle), np.sin(angle)
    first, second = (slice(0, None, 2), slice(1, None, 2)) if pairs == "adjacent" else (
        slice(0, d // 2), slice(d // 2, None))  # fmt: skip
    a, b = x[..., first], x[..., second]
    out = np.empty_like(x)
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None = None
              ) -> np.ndarray:  # fmt: skip
    """Causal grouped-query attention: q [T, H, D], k and v [T, KV, D] -> [T, H, D]; with a
    sliding `window` of W, position t sees only t-W+1..t."""
    tokens, heads, d = q.shape
    group = heads // k.shape[1]
    # Query head h reads kv head h // group, as in llama.cpp's broadcast.
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    hidden = np.triu(np.ones((tokens, tokens), dtype=bool), k=1)
    if window is not None:
        hidden |= np.tril(np.ones((tokens, tokens), dtype=bool), k=-window)
    scores[:, hidden] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v)


class Weights:
    """What a numpy forward pass reads with: each weight by name in float64 (`w(name)`),
    matrix products whose inputs `observe` sees (`linear`), and keys and values rounded as a
    KV cache of dtype `kv_cache` stores them (`cached`)."""

    def __init__(self, weights: Mapping[str, np.ndarray],
                 observe: Callable[[str, np.ndarray], None] | None = None,
                 kv_cache: str = "float64"):  # fmt: skip
        self.weights, self.observe, self.kv_cache = weights, observe, kv_cache

    def __call__(self, name: str) -> np.ndarray:
        return np.asarray(self.weights[name], dtype=np.float64)

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        if self.observe is not None:
            self.observe(name, x)
        return x @ self(name).T

    def cached(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.kv_cache).astype(np.float64)


def forward(
    weights: Mapping[str, np.ndarray],
    config: LlamaConfig,
    tokens: Sequence[int],
    observe: Callable[[str, np.ndarray], None] | None = None,
    kv_cache: str = "float64",
) -> np.ndarray:
    """Logits [len(tokens), vocab] (float64) of a causal forward pass from position 0.

    `observe(weight_name, inputs)`, if given, sees the input of every matrix product.
    `kv_cache`: the dtype keys (after RoPE) and values are rounded to, as a KV cache of that
    dtype stores them.
    """

    w = Weights(weights, observe, kv_cache)
    c = config
    t = len(tokens)
    x = w("embed_tokens.weight")[np.asarray(tokens)]
    for i in range(c.num_layers):
        p = f"layers.{i}."
        h = rms_norm(x, w(p + "input_layernorm.weight"), c.rms_norm_eps)
        qkv = w.linear(h, p + "self_attn.qkv_proj.weight")
        if c.attention_bias:
            qkv = qkv + w(p + "self_attn.qkv_proj.bias")
        q, k, v = np.split(qkv.reshape(t, -1, c.head_dim),
                           [c.num_heads, c.num_heads + c.num_kv_heads], axis=1)  # fmt: skip
        q, k = (rope(y, c.rope_theta, c.rope_pairs) for y in (q, k))
        a = attention(q, w.cached(k), w.cached(v))
        x = x + w.linear(a.reshape(t, -1), p + "self_attn.o_proj.weight")

        h = rms_norm(x, w(p + "post_attention_layernorm.weight"), c.rms_norm_eps)
        gate, up = np.split(w.linear(h, p + "mlp.gate_up_proj.weight"), 2, axis=1)
        x = x + w.linear(silu(gate) * up, p + "mlp.down_proj.weight")

    x = rms_norm(x, w("norm.weight"), c.rms_norm_eps)
    out = "lm_head.weight" if "lm_head.weight" in weights else "embed_tokens.weight"
    return w.linear(x, out)


def greedy(
    weights: Mapping[str, np.ndarray], config: LlamaConfig, prompt_ids: Sequence[int], n: int
) -> list[int]:
    """The n ids generated greedily after prompt_ids (full forward pass per step)."""
    # Convert once rather than on every step's forward pass.
    weights64 = {name: np.asarray(a, dtype=np.float64) for name, a in weights.items()}
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(np.argmax(forward(weights64, config, ids)[-1])))
    return ids[len(prompt_ids) :]
