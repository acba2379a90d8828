"""A test architecture, registered from the test that uses it: a tiny Llama with biases on Q,
K and V and RMSNorm on Q and K. It is one folder, like those under models/, and one registry
entry; nothing else in tapml knows it."""

from tapml.models.architecture import Architecture, ModuleOptions

from .config import TinyQKConfig
from .reference import forward
from .weights import weight_map


def _module(config: TinyQKConfig, options: ModuleOptions):
    from .model import TinyQKForCausalLM

    return TinyQKForCausalLM(config, options)


ARCHITECTURE = Architecture(
    name="tinyqk",
    task="causal_lm",
    config=TinyQKConfig,
    module=_module,
    weight_map=weight_map,
    reference=forward,
    gguf_names=("tinyqk",),
    description="a test architecture: Llama with QKV biases and QK-norm",
)
