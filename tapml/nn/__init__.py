"""tapml's Relax layers: each one becomes a kernel of the plan.

They are written as tensor expressions (or TIR) rather than with Relax's high-level ops so
that every kernel has a known shape: matmuls accumulate in float32 and read quantized weights
directly (dequantize fused into the matmul), RoPE reads precomputed tables (in-kernel sin/cos
is imprecise on some GPUs), and attention only visits the positions it may see. An
architecture composes these; what is its own stays in its folder under models/.
"""

from .activation import gelu, gelu_multiply, silu_multiply
from .attention import ATTENTION_SPLITS, ATTENTION_TILE, attention, key_cache_shape, last_valid_row
from .base import ACC
from .causal_lm import CausalLM
from .linear import Embedding, Linear, matmul
from .norm import LayerNorm, RMSNorm, qk_norm
from .rope import RotaryTables, rotary_tables

__all__ = [
    "ACC", "ATTENTION_SPLITS", "ATTENTION_TILE", "CausalLM", "Embedding", "LayerNorm", "Linear",
    "RMSNorm", "RotaryTables", "attention", "gelu", "gelu_multiply", "key_cache_shape",
    "last_valid_row", "matmul", "qk_norm", "rotary_tables", "silu_multiply",
]  # fmt: skip
