"""TinyQK's configuration, read from GGUF metadata (the "tinyqk." keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapml.models.architecture import ConfigFields


@dataclass(frozen=True)
class TinyQKConfig(ConfigFields):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: list[str]) -> TinyQKConfig:
        def get(key: str) -> Any:
            return metadata[f"tinyqk.{key}"]

        heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
        return cls(
            vocab_size=len(metadata["tokenizer.ggml.tokens"]),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv")),
            head_dim=hidden // heads,
            rope_theta=float(get("rope.freq_base")),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            context_length=int(get("context_length")),
        )
