"""BERT in Relax: a sentence encoder (`tapml.nn.SentenceEncoder`) over fixed (batch, length)
buckets. Hidden states are kept as [B * S, hidden] rows, so the linear layers and norms
are the ones the decoders use; attention sees every unmasked position of its own row."""

from __future__ import annotations

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tapml import nn as tnn
from tapml.errors import CompileError
from tapml.nn.encoder import SentenceEncoder, attention_bias

from ..architecture import ModuleOptions
from .config import BertConfig


class Layer(nn.Module):
    def __init__(self, config: BertConfig, options: ModuleOptions, index: int):
        dtype, formats, prefix = options.dtype, options.formats, f"layers.{index}."
        hidden, inter, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = tnn.Linear(hidden, [hidden] * 3, formats[prefix + "qkv"], bias=dtype)
        self.attn_out = tnn.Linear(hidden, hidden, formats[prefix + "attn_out"], bias=dtype)
        self.attn_norm = tnn.LayerNorm(hidden, eps, dtype)
        self.up = tnn.Linear(hidden, inter, formats[prefix + "up"], bias=dtype)
        self.down = tnn.Linear(inter, hidden, formats[prefix + "down"], bias=dtype)
        self.mlp_norm = tnn.LayerNorm(hidden, eps, dtype)

    def forward(self, x: nn.Tensor, bias: nn.Tensor, batch: int, length: int) -> nn.Tensor:
        h, d = self.heads, self.head_dim
        qkv = op.reshape(self.qkv(x), (batch, length, 3, h, d))
        q, k, v = (op.permute_dims(t, [2, 0, 3, 1, 4]) for t in op.split(qkv, 3, axis=2))
        q, k, v = (op.reshape(t, (batch, h, length, d)) for t in (q, k, v))
        scores = op.matmul(q, op.permute_dims(k, [0, 1, 3, 2])) * (d**-0.5)
        probs = op.softmax(scores.astype("float32") + bias, axis=-1).astype(x.dtype)
        attn = op.permute_dims(op.matmul(probs, v), [0, 2, 1, 3])
        x = self.attn_norm(x + self.attn_out(op.reshape(attn, (batch * length, h * d))))
        return self.mlp_norm(x + self.down(tnn.gelu(self.up(x))))


class BertEncoder(SentenceEncoder):
    """BERT with `options.dtype` activations and each matrix in its weight formats."""

    def __init__(self, config: BertConfig, options: ModuleOptions):
        self.config, self.dtype = config, options.dtype
        hidden = config.hidden_size
        (embed_format,) = options.formats["embed_tokens"]
        self.embed_tokens = tnn.Embedding(config.vocab_size, hidden, embed_format, self.dtype)
        self.position_embeddings = nn.Parameter((config.max_positions, hidden), self.dtype)
        self.token_type_embeddings = nn.Parameter((config.type_vocab_size, hidden), self.dtype)
        self.embed_norm = tnn.LayerNorm(hidden, config.layer_norm_eps, self.dtype)
        self.layers = nn.ModuleList([Layer(config, options, i) for i in range(config.num_layers)])
        too_long = [b for b in options.buckets if b[1] > config.max_positions]
        if too_long:
            raise CompileError(f"bucket {too_long[0][0]}x{too_long[0][1]} is longer than the "
                               f"model's {config.max_positions} positions")  # fmt: skip
        self._entry_points(options.buckets, config.vocab_size, hidden)

    def encode(self, ids: nn.Tensor, mask: nn.Tensor) -> nn.Tensor:
        batch, length = (int(n) for n in ids.shape)
        words = self.embed_tokens(op.reshape(ids, (batch * length,)))
        x = self.embed_norm(_add_positions(words, self.position_embeddings,
                                           self.token_type_embeddings, length))  # fmt: skip
        bias = attention_bias(mask)
        for layer in self.layers:
            x = layer(x, bias, batch, length)
        return x


def _add_positions(words: nn.Tensor, positions: nn.Tensor, types: nn.Tensor, length: int
                   ) -> nn.Tensor:  # fmt: skip
    """Each row r's word embedding + the embedding of its position r % length + token type 0
    (one sentence per row)."""

    def compute(w: te.Tensor, p: te.Tensor, t: te.Tensor):
        return te.compute(w.shape, lambda r, j: w[r, j] + p[r % length, j] + t[0, j],
                          name="add_positions")  # fmt: skip

    return op.tensor_expr_op(compute, "add_positions", [words, positions, types])
