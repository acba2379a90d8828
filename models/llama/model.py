"""The Llama architecture in Relax, with static shapes and an explicit KV cache.

Entry points (all shapes fixed at compile time; only `pos` and `n_valid` vary at run time):
  decode(token[1], pos, k0, v0, ..., params)            -> logits [1, vocab], caches
  prefill(tokens[C], pos, n_valid, k0, v0, ..., params) -> logits [1, vocab] of row n_valid-1
Each layer has a key cache in tiles of positions (`tapml.nn.key_cache_shape`) and a value cache
[kv_heads, max_context, head_dim], in the KV cache dtype (the activations' or float16); kernels
write new rows in place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tapml import nn as tnn
from tapml.formats import WeightFormat

from .config import LlamaConfig

Formats = dict[str, tuple[WeightFormat, ...]]  # matrix name -> the format of each part


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, formats: Formats, prefix: str):
        self.heads, self.kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        hidden, q_dim = config.hidden_size, self.heads * self.head_dim
        kv_dim = self.kv_heads * self.head_dim
        # Q, K and V stacked (rows in that order): one pass over x for all three
        self.qkv_proj = tnn.Linear(hidden, [q_dim, kv_dim, kv_dim], formats[prefix + "qkv_proj"])
        self.o_proj = tnn.Linear(q_dim, hidden, formats[prefix + "o_proj"])

    def forward(self, x, k_cache, v_cache, rope, pos, n_valid):
        h, kv = self.heads, self.kv_heads
        qkv = op.reshape(self.qkv_proj(x), (x.shape[0], h + 2 * kv, self.head_dim))
        q, k_cache, v_cache = rope(qkv, h, k_cache, v_cache, pos, n_valid)
        return self.o_proj(tnn.attention(q, k_cache, v_cache, pos)), k_cache, v_cache


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, formats: Formats, prefix: str):
        hidden, inter = config.hidden_size, config.intermediate_size
        # gate rows, then up rows
        self.gate_up_proj = tnn.Linear(hidden, [inter, inter], formats[prefix + "gate_up_proj"])
        self.down_proj = tnn.Linear(inter, hidden, formats[prefix + "down_proj"])

    def forward(self, x):
        return self.down_proj(tnn.silu_multiply(self.gate_up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: str, formats: Formats, index: int):
        eps, prefix = config.rms_norm_eps, f"layers.{index}."
        self.input_layernorm = tnn.RMSNorm(config.hidden_size, eps, dtype)
        self.self_attn = Attention(config, formats, prefix + "self_attn.")
        self.post_attention_layernorm = tnn.RMSNorm(config.hidden_size, eps, dtype)
        self.mlp = MLP(config, formats, prefix + "mlp.")

    def forward(self, x, k_cache, v_cache, rope, pos, n_valid):
        a, k_cache, v_cache = self.self_attn(
            self.input_layernorm(x), k_cache, v_cache, rope, pos, n_valid
        )
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class LlamaForCausalLM(nn.Module):
    """`dtype`: the activations' (and the norms'); `formats`: each matrix's weight formats
    (`tapml.quantization.Quantization.formats`)."""

    def __init__(self, config: LlamaConfig, dtype: str, formats: Formats, max_context: int,
                 chunk: int, kv_cache: str | None = None):  # fmt: skip
        self.config, self.dtype = config, dtype
        self.max_context, self.chunk = max_context, chunk
        self.kv_cache = kv_cache or dtype
        (embed_format,) = formats["embed_tokens"]
        self.embed_tokens = tnn.Embedding(config.vocab_size, config.hidden_size, embed_format,
                                          dtype)  # fmt: skip
        self.rope = tnn.RotaryTables(max_context, config.head_dim)
        self.layers = nn.ModuleList([Block(config, dtype, formats, i)
                                     for i in range(config.num_layers)])  # fmt: skip
        self.norm = tnn.RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = tnn.Linear(config.hidden_size, config.vocab_size, formats["lm_head"])
        # The exporter names each function argument after the method's parameters, and
        # the number of caches depends on the config: give the entry points real names.
        caches = self.cache_names()
        self.decode = _named_args(self._decode, ["token", "pos", *caches])
        self.prefill = _named_args(self._prefill, ["tokens", "pos", "n_valid", *caches])

    def _forward(self, ids, pos, n_valid, caches):
        h = self.embed_tokens(ids)
        updated = []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, caches[2 * i], caches[2 * i + 1], self.rope, pos, n_valid)
            updated += [k, v]
        if ids.shape[0] > 1:
            h = tnn.last_valid_row(h, n_valid)
        h = self.norm(h)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.project(h)
        else:
            logits = self.lm_head(h)
            logits = logits.astype("float32") if logits.dtype != "float32" else logits
        # Returning the updated caches keeps their in-place writes alive through DCE.
        return (logits, *updated)

    def _decode(self, token, pos, *caches):
        return self._forward(token, pos, tirx.IntImm("int64", 1), caches)

    def _prefill(self, tokens, pos, n_valid, *caches):
        return self._forward(tokens, pos, n_valid, caches)

    def cache_names(self) -> list[str]:
        return [f"{kv}_cache_{i}" for i in range(self.config.num_layers) for kv in "kv"]

    def export_spec(self) -> dict:
        kv_heads, dim = self.config.num_kv_heads, self.config.head_dim
        shapes = {"k": tnn.key_cache_shape(kv_heads, self.max_context, dim),
                  "v": [kv_heads, self.max_context, dim]}  # fmt: skip
        caches = {name: nn.spec.Tensor(shapes[name[0]], self.kv_cache)
                  for name in self.cache_names()}  # fmt: skip
        mode = {"param_mode": "plain", "effect_mode": "none"}
        return {
            "decode": {"token": nn.spec.Tensor([1], "int32"), "pos": int, **caches, "$": mode},
            "prefill": {
                "tokens": nn.spec.Tensor([self.chunk], "int32"),
                "pos": int,
                "n_valid": int,
                **caches,
                "$": mode,
            },
        }


def _named_args(fn: Callable, names: list[str]) -> Callable:
    def method(*args):
        return fn(*args)

    kind = inspect.Parameter.POSITIONAL_ONLY
    method.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in names])
    return method
