"""Gemma-3's configuration, read from GGUF metadata or a dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapml.errors import ModelNotFound

from ..architecture import ConfigFields

# What the GGUF does not hold, and belongs to the architecture: which layers slide, and the
# RoPE base of the sliding ones (the GGUF's freq_base is the global layers').
SLIDING_PATTERN = 6  # every 6th layer (0-based 5, 11, 17, ...) attends globally
LOCAL_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class Gemma3Config(ConfigFields):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    rope_theta: float = 1000000.0  # global layers'
    local_rope_theta: float = LOCAL_ROPE_THETA
    rms_norm_eps: float = 1e-6
    context_length: int = 32768

    def is_sliding(self, layer: int) -> bool:
        return (layer + 1) % SLIDING_PATTERN != 0

    def layer_rope_theta(self, layer: int) -> float:
        return self.local_rope_theta if self.is_sliding(layer) else self.rope_theta

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: list[str]) -> Gemma3Config:
        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"gemma3.{key}", default)
            if value is None:
                raise ModelNotFound(f"GGUF metadata has no 'gemma3.{key}'")
            return value

        if "output.weight" in tensor_names:
            raise ModelNotFound("this Gemma-3 GGUF has an output matrix; tapml's ties it to the "
                                "embedding")  # fmt: skip
        heads = int(get("attention.head_count"))
        return cls(
            vocab_size=len(metadata["tokenizer.ggml.tokens"]),
            hidden_size=int(get("embedding_length")),
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("attention.key_length")),
            sliding_window=int(get("attention.sliding_window")),
            rope_theta=float(get("rope.freq_base", 1000000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            context_length=int(get("context_length", 32768)),
        )
