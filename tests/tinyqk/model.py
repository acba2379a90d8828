"""TinyQK in Relax: tapml.nn's shared layers composed, nothing of its own but the order."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tapml import nn as tnn
from tapml.models.architecture import ModuleOptions

from .config import TinyQKConfig


class Block(nn.Module):
    def __init__(self, c: TinyQKConfig, options: ModuleOptions, i: int):
        dtype, formats, prefix = options.dtype, options.formats, f"layers.{i}."
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.attn_norm = tnn.RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.qkv_proj = tnn.Linear(c.hidden_size, [q_dim, kv_dim, kv_dim],
                                   formats[prefix + "qkv_proj"], bias=dtype)  # fmt: skip
        self.q_norm = tnn.RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
        self.k_norm = tnn.RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
        self.o_proj = tnn.Linear(q_dim, c.hidden_size, formats[prefix + "o_proj"])
        self.ffn_norm = tnn.RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        inter = c.intermediate_size
        self.gate_up_proj = tnn.Linear(c.hidden_size, [inter, inter],
                                       formats[prefix + "gate_up_proj"])  # fmt: skip
        self.down_proj = tnn.Linear(inter, c.hidden_size, formats[prefix + "down_proj"])

    def forward(self, x, k_cache, v_cache, rope, pos, n_valid):
        h, kv = self.heads, self.kv_heads
        qkv = op.reshape(self.qkv_proj(self.attn_norm(x)), (x.shape[0], h + 2 * kv, self.head_dim))
        qkv = tnn.qk_norm(qkv, self.q_norm, self.k_norm, h, kv)
        q, k_cache, v_cache = rope(qkv, h, k_cache, v_cache, pos, n_valid)
        x = x + self.o_proj(tnn.attention(q, k_cache, v_cache, pos))
        x = x + self.down_proj(tnn.silu_multiply(self.gate_up_proj(self.ffn_norm(x))))
        return x, k_cache, v_cache


class TinyQKForCausalLM(tnn.CausalLM):
    def __init__(self, config: TinyQKConfig, options: ModuleOptions):
        self.config = config
        (embed,) = options.formats["embed_tokens"]
        self.embed_tokens = tnn.Embedding(config.vocab_size, config.hidden_size, embed,
                                          options.dtype)  # fmt: skip
        self.rope = tnn.RotaryTables(options.max_context, config.head_dim)
        self.layers = nn.ModuleList([Block(config, options, i) for i in range(config.num_layers)])
        self.norm = tnn.RMSNorm(config.hidden_size, config.rms_norm_eps, options.dtype)
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
        return (self.embed_tokens.project(self.norm(h)), *updated)

    def tables(self) -> dict:
        cos, sin = tnn.rotary_tables(self.max_context, self.config.head_dim,
                                     self.config.rope_theta)  # fmt: skip
        return {"rope.cos": cos, "rope.sin": sin}
