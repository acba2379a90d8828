"""What an architecture declares, so that the compiler, the runtimes and the tools need nothing
else: an architecture is one folder under models/ and one entry in `ARCHITECTURES`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tapml.formats import WeightFormat


class Config(Protocol):
    """An architecture's configuration: a dataclass read from a model file's metadata."""

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], tensor_names: Sequence[str]) -> Config: ...

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config: ...

    def asdict(self) -> dict[str, Any]: ...


class ConfigFields:
    """`from_dict` and `asdict` for a config dataclass: what an artifact's config records."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModuleOptions:
    """What a Relax module is built with besides the config: the activations' dtype, each
    matrix's weight formats (`Quantization.formats`), and the compile options that shape it."""

    dtype: str
    formats: Mapping[str, tuple[WeightFormat, ...]]
    max_context: int
    chunk: int
    kv_cache: str
    buckets: tuple[tuple[int, int], ...] = ()  # an encoder's (batch, length) entry points


@dataclass(frozen=True)
class WeightMap:
    """Where each of tapml's weights comes from: the source tensors it is made of, stacked by
    rows (parts of a fused projection) or concatenated (vectors), in order."""

    matrices: dict[str, list[str]]  # a matrix's name (its planes follow) -> source tensors
    vectors: dict[str, list[str]]  # a vector parameter's name (norms, biases) -> source tensors

    def all(self) -> dict[str, list[str]]:
        return {**self.matrices, **self.vectors}

    @classmethod
    def gguf_layers(cls, num_layers: int, matrices: Mapping[str, Sequence[str]],
                    norms: Mapping[str, str], biases: Sequence[str] = (),
                    untied_output: bool = False) -> WeightMap:  # fmt: skip
        """llama.cpp's layout of a decoder's GGUF: the token embedding (and the output matrix,
        when untied) and the final norm, then per layer i each fused matrix `layers.{i}.OURS`
        stacked from `blk.{i}.T.weight` for T in `matrices[OURS]`, each norm
        `layers.{i}.OURS.weight` from `blk.{i}.norms[OURS].weight`, and for each matrix named
        in `biases` its bias `layers.{i}.OURS.bias` from its parts' `.bias` tensors."""
        tops = {"embed_tokens": ["token_embd.weight"]}
        if untied_output:
            tops["lm_head"] = ["output.weight"]
        vectors = {"norm.weight": ["output_norm.weight"]}
        for i in range(num_layers):
            for ours, theirs in matrices.items():
                tops[f"layers.{i}.{ours}"] = [f"blk.{i}.{t}.weight" for t in theirs]
            for ours, theirs in norms.items():
                vectors[f"layers.{i}.{ours}.weight"] = [f"blk.{i}.{theirs}.weight"]
            for ours in biases:
                vectors[f"layers.{i}.{ours}.bias"] = [f"blk.{i}.{t}.bias" for t in matrices[ours]]
        return cls(tops, vectors)


@dataclass(frozen=True)
class Architecture:
    """One architecture, as the registry knows it.

    `module(config, options)` builds the Relax `nn.Module`: its `export_spec()` gives the
    entry points, `state_names()` the tensors kept between calls, `task()` how a runtime
    drives it (docs/formats.md, "task"), and `tables()` the parameters computed rather than
    read from the model file (e.g. RoPE's). `weight_map(config)` says where every weight
    comes from (`WeightMap`); matrices are stored in the quantization's formats, vectors
    in the activations' dtype. `reference` is an independent numpy forward pass over
    `{matrix}.weight` and the vectors, the judge of the compiled model: for a causal LM
    `reference(weights, config, tokens, observe=None, kv_cache="float64")` gives float64
    logits per token (and calibrates tapml's 4-bit groups); for an embedding model
    `reference(weights, config, texts)` gives each text's (token ids') unit vector.

    A GGUF's `general.architecture` picks the architecture by `gguf_names`; a Hugging Face
    checkpoint's config.json `model_type` by `hf_names` (its config read by
    `config.from_hf`).
    """

    name: str
    task: str  # "causal_lm" or "embedding"
    config: type
    module: Callable[[Any, ModuleOptions], Any]
    weight_map: Callable[[Any], WeightMap]
    reference: Callable[..., np.ndarray]
    gguf_names: tuple[str, ...]  # the GGUF general.architecture values it reads
    hf_names: tuple[str, ...] = ()  # the config.json model_type values it reads
    tokenizer: str = "gguf"  # where the tokenizer comes from: the GGUF's metadata, or
    # "tokenizer.json" next to a Hugging Face checkpoint
    chat: bool = True  # whether the model's chat template (if any) is used
    dtypes: tuple[str, ...] = ("float32", "float16")  # activation dtypes it computes in
    description: str = field(default="", compare=False)

    def matrix_parts(self, config: Any) -> dict[str, int]:
        """Each matrix's number of stacked parts."""
        return {name: len(parts) for name, parts in self.weight_map(config).matrices.items()}
