"""The Qwen2 architecture (Qwen2, Qwen2.5, Qwen2.5-Coder): Llama's layers with biases on Q, K
and V and RoPE over halves, which its config says; the module, weights and reference are
Llama's."""

from ..architecture import Architecture
from ..llama import ARCHITECTURE as LLAMA
from .config import Qwen2Config

ARCHITECTURE = Architecture(
    name="qwen2",
    task=LLAMA.task,
    config=Qwen2Config,
    module=LLAMA.module,
    weight_map=LLAMA.weight_map,
    reference=LLAMA.reference,
    gguf_names=("qwen2",),
    description="Qwen2/2.5 decoders: Llama's layers with Q/K/V biases and RoPE over halves",
)
