"""The Llama architecture (Llama 2/3, SmolLM2, TinyLlama, ...)."""

from ..architecture import Architecture, ModuleOptions
from .config import LlamaConfig
from .reference import forward
from .weights import weight_map


def _module(config: LlamaConfig, options: ModuleOptions):
    from .model import LlamaForCausalLM  # Relax: imported only to compile

    return LlamaForCausalLM(config, options)


ARCHITECTURE = Architecture(
    name="llama",
    task="causal_lm",
    config=LlamaConfig,
    module=_module,
    weight_map=weight_map,
    reference=forward,
    gguf_names=("llama",),
    description="Llama 2/3 decoders: RMSNorm, RoPE over adjacent pairs, GQA, SwiGLU",
)
