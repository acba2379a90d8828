"""The Llama architecture's configuration, read from GGUF metadata or a dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tapml.errors import ModelNotFound

from ..architecture import ConfigFields


@dataclass(frozen=True)
class LlamaConfig(ConfigFields):
    """A Llama-family decoder. Relatives that differ only in what these fields say (Qwen2:
    Q/K/V biases, RoPE over halves) subclass it with their GGUF key prefix."""

    GGUF_PREFIX: ClassVar[str] = "llama"  # general.architecture, and the metadata keys' prefix

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    context_length: int = 2048
    attention_bias: bool = False  # biases on the Q, K and V projections
    # RoPE rotates (x[2i], x[2i+1]) ("adjacent", llama.cpp's llama GGUFs store Q and K
    # permuted for it) or (x[i], x[i + d/2]) ("halves", GPT-NeoX style)
    rope_pairs: str = "adjacent"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_pairs not in ("adjacent", "halves"):
            raise ValueError(f"rope_pairs is 'adjacent' or 'halves', got {self.rope_pairs!r}")

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_names: list[str]) -> LlamaConfig:
        prefix = cls.GGUF_PREFIX
        arch = metadata.get("general.architecture")
        if arch != prefix:
            raise ModelNotFound(f"expected a {prefix}-architecture GGUF, this one is {arch!r}")

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{prefix}.{key}", default)
            if value is None:
                raise ModelNotFound(f"GGUF metadata has no '{prefix}.{key}'")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        vocab = metadata.get(f"{prefix}.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("rope.dimension_count", hidden // heads)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in tensor_names,
            context_length=int(get("context_length", 2048)),
            attention_bias="blk.0.attn_q.bias" in tensor_names,
        )
