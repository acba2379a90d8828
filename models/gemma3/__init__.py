"""The Gemma-3 architecture (text decoders: Gemma-3 270M, 1B, ...): QK-norm, norms before and
after attention and the MLP, GeGLU, embeddings scaled by sqrt(hidden), and sliding-window
layers with their own RoPE base between global ones. Its residual stream outgrows float16,
so it computes in float32 on every target."""

from ..architecture import Architecture, ModuleOptions
from .config import Gemma3Config
from .reference import forward
from .weights import weight_map


def _module(config: Gemma3Config, options: ModuleOptions):
    from .model import Gemma3ForCausalLM  # Relax: imported only to compile

    return Gemma3ForCausalLM(config, options)


ARCHITECTURE = Architecture(
    name="gemma3",
    task="causal_lm",
    config=Gemma3Config,
    module=_module,
    weight_map=weight_map,
    reference=forward,
    gguf_names=("gemma3",),
    chat=False,
    dtypes=("float32",),
    description="Gemma-3 decoders: QK-norm, pre- and post-norms, GeGLU, sliding windows",
)
