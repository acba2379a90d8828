"""Where BERT's weights come from in a Hugging Face checkpoint (BertModel's tensor names)."""

from __future__ import annotations

from ..architecture import WeightMap
from .config import BertConfig


def weight_map(config: BertConfig) -> WeightMap:
    """Q, K and V stacked into one matrix per layer (one matmul), their biases likewise."""
    matrices = {"embed_tokens": ["embeddings.word_embeddings.weight"]}
    vectors = {
        "position_embeddings": ["embeddings.position_embeddings.weight"],
        "token_type_embeddings": ["embeddings.token_type_embeddings.weight"],
        "embed_norm.weight": ["embeddings.LayerNorm.weight"],
        "embed_norm.bias": ["embeddings.LayerNorm.bias"],
    }
    for i in range(config.num_layers):
        hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
        qkv = [f"{hf}attention.self.{p}" for p in ("query", "key", "value")]
        linears = {"qkv": qkv, "attn_out": [f"{hf}attention.output.dense"],
                   "up": [f"{hf}intermediate.dense"], "down": [f"{hf}output.dense"]}  # fmt: skip
        for name, parts in linears.items():
            matrices[ours + name] = [p + ".weight" for p in parts]
            vectors[ours + name + ".bias"] = [p + ".bias" for p in parts]
        norms = {"attn_norm": f"{hf}attention.output.LayerNorm",
                 "mlp_norm": f"{hf}output.LayerNorm"}  # fmt: skip
        for name, theirs in norms.items():
            vectors[f"{ours}{name}.weight"] = [theirs + ".weight"]
            vectors[f"{ours}{name}.bias"] = [theirs + ".bias"]
    return WeightMap(matrices, vectors)
