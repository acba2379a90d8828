"""Qwen2's configuration: a Llama-family decoder with Q/K/V biases and RoPE over halves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..llama.config import LlamaConfig


@dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    GGUF_PREFIX: ClassVar[str] = "qwen2"

    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True
    rope_pairs: str = "halves"
