"""The Llama architecture in Relax, with static shapes and an explicit KV cache: the entry
points of `tapml.nn.CausalLM`. Each layer has a key cache in tiles of positions
(`tapml.nn.key_cache_shape`) and a value cache [kv_heads, max_context, head_dim], in the KV
cache dtype (the activations' or float16); kernels write new rows in place.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tapml import nn as tnn
from tapml.formats import WeightFormat

from ..architecture import ModuleOptions
from .config import LlamaConfig

Formats = dict[str, tuple[WeightFormat, ...]]  # matrix name -> the format of each part


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: str, formats: Formats, prefix: str):
        self.heads, self.kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        hidden, q_dim = config.hidden_size, self.heads * self.head_dim
        kv_dim = self.kv_heads * self.head_dim
        # Q, K and V stacked (rows in that order): one pass over x for all three
        self.qkv_proj = tnn.Linear(hidden, [q_dim, kv_dim, kv_dim], formats[prefix + "qkv_proj"],
                                   bias=dtype if config.attention_bias else None)
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
        self.self_attn = Attention(config, dtype, formats, prefix + "self_attn.")
        self.post_attention_layernorm = tnn.RMSNorm(config.hidden_size, eps, dtype)
        self.mlp = MLP(config, formats, prefix + "mlp.")

    def forward(self, x, k_cache, v_cache, rope, pos, n_valid):
        a, k_cache, v_cache = self.self_attn(
            self.input_layernorm(x), k_cache, v_cache, rope, pos, n_valid
        )
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class LlamaForCausalLM(tnn.CausalLM):
    """Llama with `options.dtype` activations (and norms) and each matrix in its weight
    formats (`options.formats`)."""

    def __init__(self, config: LlamaConfig, options: ModuleOptions):
        self.config = config
        dtype, formats = options.dtype, options.formats
        (embed_format,) = formats["embed_tokens"]
        self.embed_tokens = tnn.Embedding(config.vocab_size, config.hidden_size, embed_format,
                                          dtype)  # fmt: skip
        self.rope = tnn.RotaryTables(options.max_context, config.head_dim, config.rope_pairs)
        self.layers = nn.ModuleList([Block(config, dtype, formats, i)
                                     for i in range(config.num_layers)])  # fmt: skip
        self.norm = tnn.RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = tnn.Linear(config.hidden_size, config.vocab_size, formats["lm_head"])
        self._entry_points(config.num_layers, config.num_kv_heads, config.head_dim,
                           options.max_context, options.chunk, options.kv_cache,
                           config.vocab_size)  # fmt: skip

    def forward_tokens(self, ids, pos, n_valid, caches):
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

    def tables(self) -> dict:
        cos, sin = tnn.rotary_tables(self.max_context, self.config.head_dim,
                                     self.config.rope_theta)  # fmt: skip
        return {"rope.cos": cos, "rope.sin": sin}
