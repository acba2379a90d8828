"""An independent numpy forward pass of BERT sentence embeddings, in float64: the judge of
the compiled model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .config import BertConfig

_erf = np.frompyfunc(math.erf, 1, 1)  # exact to float64, unlike the kernels' polynomial


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def embed(weights: Mapping[str, np.ndarray], config: BertConfig,
          texts: Sequence[Sequence[int]]) -> np.ndarray:  # fmt: skip
    """The unit-length sentence embedding [len(texts), hidden] of each text's token ids (its
    [CLS] and [SEP] included), each text alone: no padding."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    out = []
    for ids in texts:
        out.append(_embed_one(w, config, np.asarray(ids)))
    return np.stack(out)


def _embed_one(w: Mapping[str, np.ndarray], c: BertConfig, ids: np.ndarray) -> np.ndarray:
    n, heads, d = len(ids), c.num_heads, c.head_dim
    x = (w["embed_tokens.weight"][ids] + w["position_embeddings"][:n]
         + w["token_type_embeddings"][0])  # fmt: skip
    x = _layer_norm(x, w["embed_norm.weight"], w["embed_norm.bias"], c.layer_norm_eps)
    for i in range(c.num_layers):
        p = f"layers.{i}."

        def linear(h, name, p=p):
            return h @ w[f"{p}{name}.weight"].T + w[f"{p}{name}.bias"]

        q, k, v = np.split(linear(x, "qkv"), 3, axis=-1)
        q, k, v = (t.reshape(n, heads, d).transpose(1, 0, 2) for t in (q, k, v))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(n, heads * d)
        x = _layer_norm(x + linear(attn, "attn_out"), w[p + "attn_norm.weight"],
                        w[p + "attn_norm.bias"], c.layer_norm_eps)  # fmt: skip
        up = linear(x, "up")
        up = 0.5 * up * (1 + _erf(up / np.sqrt(2)).astype(np.float64))
        x = _layer_norm(x + linear(up, "down"), w[p + "mlp_norm.weight"],
                        w[p + "mlp_norm.bias"], c.layer_norm_eps)  # fmt: skip
    pooled = x.mean(0)
    return pooled / max(np.linalg.norm(pooled), 1e-12)
