"""The BERT architecture's configuration, read from a Hugging Face config.json."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tapml.errors import ModelNotFound

from ..architecture import ConfigFields


@dataclass(frozen=True)
class BertConfig(ConfigFields):
    """A BERT encoder (post-LayerNorm, learned positions, token types, erf GELU) whose
    mean-pooled, L2-normalized last hidden states are sentence embeddings (sentence-transformers'
    all-MiniLM and its relatives)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], where: str = "config.json") -> BertConfig:
        """From a Hugging Face config.json (`model_type` "bert")."""
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ModelNotFound(f"{where}: hidden_act {act!r}; tapml's BERT computes erf GELU")
        kind = d.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ModelNotFound(f"{where}: position_embedding_type {kind!r}; tapml's BERT "
                                "has learned absolute positions")  # fmt: skip
        try:
            config = cls(
                vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
                max_positions=int(d.get("max_position_embeddings", 512)),
                type_vocab_size=int(d.get("type_vocab_size", 2)),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            )  # fmt: skip
        except KeyError as e:
            raise ModelNotFound(f"{where} lacks {e.args[0]!r}, which a BERT config has") from e
        if config.hidden_size % config.num_heads:
            raise ModelNotFound(f"{where}: hidden_size {config.hidden_size} is not a multiple "
                                f"of num_attention_heads {config.num_heads}")  # fmt: skip
        return config
