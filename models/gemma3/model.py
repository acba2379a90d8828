"""Gemma-3 in Relax: tapml.nn's shared layers in Gemma's order. Five of every six layers
attend within a sliding window, with their own RoPE base; every layer keeps a full-length
cache (`tapml.nn.CausalLM`)."""

from __future__ import annotations

import math

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tapml import nn as tnn

from ..architecture import ModuleOptions
from .config import Gemma3Config


class Block(nn.Module):
    def __init__(self, c: Gemma3Config, options: ModuleOptions, i: int):
        dtype, formats, prefix, eps = options.dtype, options.formats, f"layers.{i}.", c.rms_norm_eps
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.window = c.sliding_window if c.is_sliding(i) else None
        q_dim, kv_dim, hidden = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size
        self.input_layernorm = tnn.RMSNorm(hidden, eps, dtype)
        self.qkv_proj = tnn.Linear(hidden, [q_dim, kv_dim, kv_dim], formats[prefix + "qkv_proj"])
        self.q_norm = tnn.RMSNorm(c.head_dim, eps, dtype)
        self.k_norm = tnn.RMSNorm(c.head_dim, eps, dtype)
        self.o_proj = tnn.Linear(q_dim, hidden, formats[prefix + "o_proj"])
        self.post_attention_layernorm = tnn.RMSNorm(hidden, eps, dtype)
        self.pre_feedforward_layernorm = tnn.RMSNorm(hidden, eps, dtype)
        inter = c.intermediate_size
        self.gate_up_proj = tnn.Linear(hidden, [inter, inter], formats[prefix + "gate_up_proj"])
        self.down_proj = tnn.Linear(inter, hidden, formats[prefix + "down_proj"])
        self.post_feedforward_layernorm = tnn.RMSNorm(hidden, eps, dtype)

    def forward(self, x, k_cache, v_cache, rope, pos, n_valid):
        h, kv = self.heads, self.kv_heads
        qkv = self.qkv_proj(self.input_layernorm(x))
        qkv = tnn.qk_norm(op.reshape(qkv, (x.shape[0], h + 2 * kv, self.head_dim)),
                          self.q_norm, self.k_norm, h, kv)  # fmt: skip
        q, k_cache, v_cache = rope(qkv, h, k_cache, v_cache, pos, n_valid)
        a = self.o_proj(tnn.attention(q, k_cache, v_cache, pos, window=self.window))
        x = self.post_attention_layernorm.add_to(x, a)
        gate_up = self.gate_up_proj(self.pre_feedforward_layernorm(x))
        m = self.down_proj(tnn.gelu_multiply(gate_up, "tanh"))
        return self.post_feedforward_layernorm.add_to(x, m), k_cache, v_cache


class Gemma3ForCausalLM(tnn.CausalLM):
    def __init__(self, config: Gemma3Config, options: ModuleOptions):
        self.config = config
        (embed,) = options.formats["embed_tokens"]
        self.embed_tokens = tnn.Embedding(config.vocab_size, config.hidden_size, embed,
                                          options.dtype)  # fmt: skip
        self.rope_local = tnn.RotaryTables(options.max_context, config.head_dim, "halves")
        self.rope_global = tnn.RotaryTables(options.max_context, config.head_dim, "halves")
        self.layers = nn.ModuleList([Block(config, options, i) for i in range(config.num_layers)])
        self.norm = tnn.RMSNorm(config.hidden_size, config.rms_norm_eps, options.dtype)
        self._entry_points(config.num_layers, config.num_kv_heads, config.head_dim,
                           options.max_context, options.chunk, options.kv_cache,
                           config.vocab_size)  # fmt: skip

    def forward_tokens(self, ids, pos, n_valid, caches):
        h = self.embed_tokens(ids) * math.sqrt(self.config.hidden_size)
        updated = []
        for i, layer in enumerate(self.layers):
            rope = self.rope_local if self.config.is_sliding(i) else self.rope_global
            h, k, v = layer(h, caches[2 * i], caches[2 * i + 1], rope, pos, n_valid)
            updated += [k, v]
        if ids.shape[0] > 1:
            h = tnn.last_valid_row(h, n_valid)
        return (self.embed_tokens.project(self.norm(h)), *updated)

    def tables(self) -> dict:
        c, tables = self.config, {}
        for name, theta in (("rope_local", c.local_rope_theta), ("rope_global", c.rope_theta)):
            cos, sin = tnn.rotary_tables(self.max_context, c.head_dim, theta)
            tables |= {f"{name}.cos": cos, f"{name}.sin": sin}
        return tables
