"""The compiler driver: model + quantization + target -> a self-contained artifact directory.

    DIR/tapml-config.json   what was compiled, with which settings (format versioned)
    DIR/plan.json           the execution plan (docs/formats.md)
    DIR/kernels_<target>.*  the plan's kernels for the target
    DIR/weights/            converted weights: .bin shards + index.json
    DIR/tokenizer/          tokenizer.json + tokenizer_config.json (chat template included)

The directory is built under DIR.partial and renamed when complete, so DIR is never
half-written; an interrupted compile resumes from the steps DIR.partial already holds.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import CompileError, TapmlError
from .fileio import read_document, write_atomic
from .formats import WeightFormat
from .gguf import GGUFFile
from .models.llama.config import LlamaConfig
from .models.llama.weights import matrix_parts, weight_map
from .quantization import DEFAULT, Quantization, format_names, get_quantization

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

log = logging.getLogger("tapml")

CONFIG_FILE = "tapml-config.json"
CONFIG_FORMAT, CONFIG_VERSION = "tapml-artifact", 1
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_CHUNK = 32
KV_CACHE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class CompileOptions:
    """Everything besides the weights that determines a compiled artifact."""

    target: str = "llvm"
    quantization: str | None = None  # None: as stored (gguf)
    max_context: int = DEFAULT_MAX_CONTEXT
    chunk: int = DEFAULT_CHUNK
    target_options: dict[str, str] = field(default_factory=dict)
    kv_cache: str | None = None  # the KV cache's dtype; None: the target's default

    def resolved(self) -> CompileOptions:
        """Options with defaults filled in (what a cache key must hash)."""
        from tapml.targets import get_target

        spec = get_target(self.target)
        quant = self.quantization or DEFAULT
        get_quantization(quant)
        kv_cache = self.kv_cache or spec.kv_cache(quant)
        if kv_cache not in KV_CACHE_DTYPES:
            raise TapmlError(
                f"unknown KV cache dtype {kv_cache!r}; choose one of: {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.chunk < 1 or self.max_context < self.chunk:
            raise TapmlError(
                f"need 1 <= chunk <= max_context, got chunk={self.chunk}, "
                f"max_context={self.max_context}"
            )
        return CompileOptions(
            self.target, quant, self.max_context, self.chunk,
            spec.resolved_options(self.target_options), kv_cache,
        )  # fmt: skip


def compile_model(
    gguf_path: Path, output: Path, options: CompileOptions, progress: bool = True
) -> Path:
    """Compile the GGUF model at `gguf_path` into the artifact directory `output`."""
    from tapml.convert import convert, gguf_sources, stored_types, weight_summary
    from tapml.tokenizer import Tokenizer

    options = options.resolved()
    quant = get_quantization(options.quantization)
    gguf = GGUFFile(gguf_path)
    config = LlamaConfig.from_gguf(gguf.metadata, gguf.tensor_names())
    if options.max_context > config.context_length:
        log.warning(
            "max_context %d is beyond the model's trained context of %d",
            options.max_context, config.context_length,
        )  # fmt: skip
    sources = gguf_sources(gguf, weight_map(config))
    formats = quant.formats(stored_types(sources))
    output = Path(output)
    work = output.with_name(output.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    log.info("building the %s plan for %s (%s)", options.target, gguf_path.name, quant.name)
    model, plan, fused = build_plan(config, quant, options, formats)
    plan.save(work / "plan.json")
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    tokenizer.save(work / "tokenizer")
    if not (work / "weights" / "index.json").is_file():
        from tapml.weights import save_shards

        log.info("converting weights to %s", quant.name)
        importance = calibrate(sources, config, tokenizer) if quant.calibrated else {}
        params = _with_tables(convert(sources, quant, formats, importance), plan.names("param"),
                              config, options.max_context)  # fmt: skip
        save_shards(params, work / "weights", progress=progress)
    from tapml.targets import get_target

    library = work / get_target(options.target).kernels
    if not library.is_file():
        from tapml.lower import kernel_functions
        from tapml.targets import build_kernels

        kernels = {k: f for k, f in kernel_functions(fused).items() if k in plan.kernels}
        build_kernels(kernels, plan, options, library, progress=progress)
    write_atomic(
        work / CONFIG_FILE,
        json.dumps(
            {
                "format": CONFIG_FORMAT,
                "version": CONFIG_VERSION,
                "tapml_version": __version__,
                "model": {"source": gguf_path.name, "architecture": "llama", **config.asdict()},
                "options": asdict(options),
                "weights": weight_summary(sources, formats),
            },
            indent=1,
        ).encode(),
    )
    if output.exists():
        shutil.rmtree(output)
    work.rename(output)
    log.info("compiled %s in %.0fs", output, time.perf_counter() - start)
    return output


def model_formats(config: LlamaConfig, quant: Quantization,
                  stored: dict[str, tuple[str, ...]] | None = None
                  ) -> dict[str, tuple[WeightFormat, ...]]:  # fmt: skip
    """Each matrix's formats under `quant`, its parts stored as `stored` says (float32 where
    not given: what re-quantizing schemes and float sources see)."""
    if stored is None:
        stored = {name: ("F32",) * parts for name, parts in matrix_parts(config).items()}
    return quant.formats(stored)


def build_plan(config: LlamaConfig, quant: Quantization, options: CompileOptions,
               formats: dict[str, tuple[WeightFormat, ...]] | None = None):  # fmt: skip
    """(model, plan, fused Relax module) for the given config and compile options; `formats`
    (see `model_formats`) by default as re-quantized from float weights."""
    from tapml.lower import extract_plan, fuse
    from tapml.models.llama.model import LlamaForCausalLM

    options = options.resolved()
    formats = formats if formats is not None else model_formats(config, quant)
    model = LlamaForCausalLM(config, quant.dtype, formats, options.max_context, options.chunk,
                             options.kv_cache)  # fmt: skip
    mod, named = model.export_tvm(spec=model.export_spec())
    fused = fuse(mod)
    meta = {
        "architecture": "llama",
        "vocab_size": config.vocab_size,
        "quantization": quant.name,
        "dtype": quant.dtype,
        "kv_cache": options.kv_cache,
        "max_context": options.max_context,
        "chunk": options.chunk,
        "weight_formats": format_names(formats),
    }
    plan = extract_plan(fused, [n for n, _ in named], model.cache_names(), meta)
    return model, plan, fused


def _with_tables(params, param_names: list[str], config: LlamaConfig, max_context: int):
    """The converted weights, then RoPE's tables; every parameter the plan names must come."""
    from tapml.nn import rotary_tables

    produced = set()
    for name, array in params:
        produced.add(name)
        yield name, array
    cos, sin = rotary_tables(max_context, config.head_dim, config.rope_theta)
    yield "rope.cos", cos
    yield "rope.sin", sin
    missing = set(param_names) - produced - {"rope.cos", "rope.sin"}
    if missing:
        raise CompileError(
            f"the weights lack {len(missing)} parameters the model needs: {sorted(missing)[:5]}"
        )


def calibrate(sources, config: LlamaConfig, tokenizer: Tokenizer):
    """Activation importance of every weight matrix, from the float model on calibration text."""
    from tapml.calibration import CALIBRATION_TEXT, activation_importance
    from tapml.convert import float_weights
    from tapml.models.llama.reference import forward

    tokens = tokenizer.encode(CALIBRATION_TEXT)
    log.info("calibrating quantization on %d tokens", len(tokens))
    return activation_importance(forward, float_weights(sources), config, tokens)


def describe(artifact: Path) -> dict[str, Any]:
    """The artifact's tapml-config.json, checked."""
    return read_document(
        Path(artifact) / CONFIG_FILE, CONFIG_FORMAT, CONFIG_VERSION, TapmlError,
        "compile the model again",
        missing=f"{artifact} is not a compiled tapml model (no {CONFIG_FILE})",
    )
