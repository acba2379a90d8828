"""The BERT architecture as a sentence encoder (all-MiniLM, and BERT checkpoints alike)."""

from ..architecture import Architecture, ModuleOptions
from .config import BertConfig
from .reference import embed
from .weights import weight_map


def _module(config: BertConfig, options: ModuleOptions):
    from .model import BertEncoder  # Relax: imported only to compile

    return BertEncoder(config, options)


ARCHITECTURE = Architecture(
    name="bert",
    task="embedding",
    config=BertConfig,
    module=_module,
    weight_map=weight_map,
    reference=embed,
    gguf_names=(),
    hf_names=("bert",),
    tokenizer="tokenizer.json",
    chat=False,
    description="BERT sentence encoders: post-LayerNorm, learned positions, erf GELU, mean "
    "pooling",
)
