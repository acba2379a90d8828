"""The compiler driver: model file + quantization + target -> a compiled artifact directory
(`tapml.artifact`), for any architecture in the registry (`tapml.models.ARCHITECTURES`).

The directory is built under DIR.partial and renamed when complete, so DIR is never
half-written; an interrupted compile resumes from the steps DIR.partial already holds.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .artifact import CONFIG_FORMAT, CONFIG_VERSION, Artifact
from .errors import CompileError, TapmlError
from .fileio import write_atomic
from .formats import WeightFormat
from .gguf import GGUFFile
from .graph import is_onnx, parse_input_shapes
from .models import Architecture, gguf_architecture, hf_architecture
from .models.architecture import ModuleOptions
from .quantization import DEFAULT, Quantization, format_names, get_quantization, split_rows

if TYPE_CHECKING:
    from .plan import Plan
    from .safetensors_file import SafetensorsFile
    from .tokenizer import Tokenizer

log = logging.getLogger("tapml")

DEFAULT_MAX_CONTEXT = 2048
DEFAULT_CHUNK = 32
KV_CACHE_DTYPES = ("float32", "float16")
# an embedding model's entry points, (batch, length); texts are padded to the next one
DEFAULT_BUCKETS = ((1, 128), (8, 128), (1, 256))


def default_quantization(model_path: Path | None) -> str:
    """The scheme a model file compiles with unless told: as stored for a GGUF, float32 for a
    float checkpoint (model.safetensors) or an ONNX graph."""
    from .graph import is_onnx
    from .safetensors_file import is_checkpoint

    if model_path is not None and (is_checkpoint(model_path) or is_onnx(model_path)):
        return "q0f32"
    return DEFAULT


def parse_buckets(text: str) -> tuple[tuple[int, int], ...]:
    """"1x128,8x128" -> ((1, 128), (8, 128)), sorted, or a TapmlError naming the bad item."""
    buckets = set()
    for item in text.split(","):
        batch, sep, length = item.strip().partition("x")
        if not (sep and batch.isdigit() and length.isdigit()) or not int(batch) or not int(length):
            raise TapmlError(f"bucket {item.strip()!r} is not BATCHxLENGTH (e.g. 8x128)")
        buckets.add((int(batch), int(length)))
    return tuple(sorted(buckets, key=lambda b: (b[1], b[0])))


@dataclass(frozen=True)
class CompileOptions:
    """Everything besides the weights that determines a compiled artifact, every default
    filled in (what a cache key hashes). Make one with `CompileOptions.resolve`."""

    target: str
    quantization: str
    max_context: int
    chunk: int
    target_options: dict[str, Any] = field(hash=False)
    kv_cache: str  # the KV cache's dtype
    max_binding: int  # bytes: larger weights are split into row ranges (0: never)
    buckets: tuple[tuple[int, int], ...]  # an embedding model's (batch, length) entry points
    # an ONNX graph's input shapes, (name, dims) in order: a name given N times, N entry points
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @classmethod
    def resolve(cls, target: str = "llvm", quantization: str | None = None,
                max_context: int | None = None, chunk: int | None = None,
                target_options: Mapping[str, Any] | None = None,
                kv_cache: str | None = None, max_binding: int | None = None,
                buckets: Iterable[Iterable[int]] | str | None = None,
                source: Path | None = None,
                input_shapes: Iterable[str] | Iterable[tuple[str, Iterable[int]]] = ()
                ) -> CompileOptions:  # fmt: skip
        """The options with every default decided, here alone: the quantization as `source`
        stores it (`default_quantization`), the KV cache the target's default for it
        (`TargetSpec.kv_cache`), the target's machine-dependent options (llvm's CPU model),
        weights split at the binding limit every target shares
        (`tapml.targets.binding_limit`), and `DEFAULT_BUCKETS`. `input_shapes` as
        `--input-shape` gives them ("x=1,3,640,640") or parsed."""
        from tapml.targets import binding_limit, get_target

        spec = get_target(target)
        quantization = quantization or default_quantization(source)
        get_quantization(quantization)
        kv_cache = kv_cache or spec.kv_cache(quantization)
        if kv_cache not in KV_CACHE_DTYPES:
            raise TapmlError(
                f"unknown KV cache dtype {kv_cache!r}; choose one of: {', '.join(KV_CACHE_DTYPES)}"
            )
        max_context = max_context or DEFAULT_MAX_CONTEXT
        chunk = chunk or DEFAULT_CHUNK
        if chunk < 1 or max_context < chunk:
            raise TapmlError(
                f"need 1 <= chunk <= max_context, got chunk={chunk}, max_context={max_context}"
            )
        max_binding = binding_limit() if max_binding is None else max_binding
        if max_binding < 0:
            raise TapmlError(f"max_binding must be >= 0 bytes, got {max_binding}")
        if isinstance(buckets, str):
            buckets = parse_buckets(buckets)
        buckets = tuple(tuple(int(n) for n in b) for b in (buckets or DEFAULT_BUCKETS))
        shapes = [parse_input_shapes([s])[0] if isinstance(s, str) else s for s in input_shapes]
        return cls(target, quantization, max_context, chunk,
                   spec.resolved_options(dict(target_options or {})), kv_cache,
                   max_binding, buckets,
                   tuple((str(n), tuple(int(d) for d in dims)) for n, dims in shapes))  # fmt: skip

    def shaping(self, task: str) -> dict[str, Any]:
        """The options that shape an artifact of `task` (what a cache key hashes): a sentence
        encoder has no KV cache, context or prefill chunk; a causal LM no buckets; a graph
        none of these, only its input shapes."""
        unused = {"embedding": ("kv_cache", "max_context", "chunk", "input_shapes"),
                  "causal_lm": ("buckets", "input_shapes"),
                  "graph": ("kv_cache", "max_context", "chunk", "buckets")}  # fmt: skip
        return {k: v for k, v in asdict(self).items() if k not in unused[task]}

    def replace(self, **changes: Any) -> CompileOptions:
        """These options with some changed, resolved again (e.g. another target)."""
        return CompileOptions.resolve(**{**asdict(self), **changes})


@dataclass(frozen=True)
class ModelFile:
    """A model file opened for compiling (a GGUF, or a Hugging Face checkpoint's
    model.safetensors): its architecture, config and source tensors."""

    path: Path
    file: GGUFFile | SafetensorsFile
    architecture: Architecture
    config: Any

    def sources(self):
        from tapml.convert import file_sources

        return file_sources(self.file, self.architecture.weight_map(self.config).all())

    def float_weights(self) -> dict[str, np.ndarray]:
        """Every weight as float32, as the architecture's reference forward pass reads them."""
        from tapml.convert import float_weights

        return float_weights(self.sources(), self.architecture.weight_map(self.config))

    def tokenizer(self) -> Tokenizer:
        """The tokenizer where the architecture says it is (`Architecture.tokenizer`)."""
        from tapml.tokenizer import Tokenizer

        if self.architecture.tokenizer == "tokenizer.json":
            return Tokenizer.from_file(self.file.tokenizer_file)
        return Tokenizer.from_gguf_metadata(self.file.metadata)


def load_model_file(path: Path) -> ModelFile:
    """A GGUF file, its architecture found by its `general.architecture`, or a Hugging Face
    checkpoint (model.safetensors or its directory), by its config.json's `model_type`."""
    from .safetensors_file import SafetensorsFile, is_checkpoint

    if is_checkpoint(path):
        checkpoint = SafetensorsFile(path)
        arch = hf_architecture(checkpoint.architecture, str(checkpoint.directory))
        config = arch.config.from_hf(checkpoint.metadata, str(checkpoint.directory / "config.json"))
        return ModelFile(checkpoint.path, checkpoint, arch, config)
    gguf = GGUFFile(path)
    arch = gguf_architecture(gguf.architecture, str(path))
    return ModelFile(Path(path), gguf, arch, arch.config.from_gguf(gguf.metadata,
                                                                   gguf.tensor_names()))


def compile_model(model_path: Path, output: Path, options: CompileOptions,
                  progress: bool = True) -> Path:  # fmt: skip
    """Compile the model file at `model_path` (a GGUF, a checkpoint or an ONNX graph) into the
    artifact directory `output`."""
    output = Path(output)
    work = Artifact(output.with_name(output.name + ".partial"))
    work.path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build = _build_graph if is_onnx(model_path) else _build_model
    kernels, plan, described = build(Path(model_path), work, options, progress)
    library = work.kernels_file(options.target)
    if not library.is_file():
        from tapml.targets import build_kernels

        build_kernels(kernels, plan, options, library, progress=progress)
    config_doc = {
        "format": CONFIG_FORMAT, "version": CONFIG_VERSION, "tapml_version": __version__,
        "options": asdict(options), **described,
    }  # fmt: skip
    write_atomic(work.config_file, json.dumps(config_doc, indent=1).encode())
    work.write_checksums()
    if output.exists():
        shutil.rmtree(output)
    work.path.rename(output)
    log.info("compiled %s in %.0fs", output, time.perf_counter() - start)
    return output


def _build_model(model_path: Path, work: Artifact, options: CompileOptions, progress: bool
                 ) -> tuple[Any, Plan, dict[str, Any]]:  # fmt: skip
    """Write a model file's plan, tokenizer and converted weights into `work`; returns the
    kernels by name, the plan, and what the artifact's config says of the model and
    weights."""
    from tapml.convert import convert, stored_types, weight_summary
    from tapml.lower import kernel_functions

    quant = get_quantization(options.quantization)
    model = load_model_file(model_path)
    arch, config = model.architecture, model.config
    if quant.dtype not in arch.dtypes:
        raise CompileError(
            f"{arch.name} models compute in {' or '.join(arch.dtypes)}; {quant.name} computes in "
            f"{quant.dtype}: choose another --quantization"
        )
    trained = getattr(config, "context_length", None)
    if trained and options.max_context > trained:
        log.warning("max_context %d is beyond the model's trained context of %d",
                    options.max_context, trained)  # fmt: skip
    sources = model.sources()
    wmap = arch.weight_map(config)
    formats = quant.formats(stored_types({n: sources[n] for n in wmap.matrices}))
    log.info("building the %s plan for %s (%s, %s)", options.target, model.path.name, arch.name,
             quant.name)  # fmt: skip
    module, plan, fused = build_plan(arch, config, quant, options, formats)
    plan.save(work.plan_file)
    tokenizer = model.tokenizer()
    tokenizer.save(work.tokenizer_dir)
    if not (work.weights_dir / "index.json").is_file():
        from tapml.cache import publish_weights, share_weights, shared_weights_dir
        from tapml.weights import save_shards

        params = [[n, plan.buffers[n]["shape"], plan.buffers[n]["dtype"]]
                  for n in plan.names("param")]  # fmt: skip
        store = shared_weights_dir(model_path, quant.name, params, plan.model["row_splits"])
        if (store / "index.json").is_file() and share_weights(store, work.weights_dir):
            log.info("weights converted to %s already (shared with other targets): %s",
                     quant.name, store)  # fmt: skip
        else:
            log.info("converting weights to %s", quant.name)
            calibrated = quant.calibrated and arch.task == "causal_lm"  # from generated logits
            importance = calibrate(arch, sources, config, tokenizer) if calibrated else {}
            converted = convert(sources, wmap, quant, formats, importance)
            converted = _every_param(converted, module.tables(), plan.names("param"),
                                     plan.model["row_splits"])  # fmt: skip
            save_shards(converted, work.weights_dir, progress=progress)
            publish_weights(work.weights_dir, store)
    kernels = {k: f for k, f in kernel_functions(fused).items() if k in plan.kernels}
    return kernels, plan, {
        "model": {"source": model.path.name, "architecture": arch.name, **config.asdict()},
        "weights": weight_summary(sources, formats),
    }


def _build_graph(path: Path, work: Artifact, options: CompileOptions, progress: bool
                 ) -> tuple[Any, Plan, dict[str, Any]]:  # fmt: skip
    """`_build_model` for an ONNX graph: one entry point per set of input shapes, its
    weights as stored (float32)."""
    from tapml.graph import GRAPH_ARCHITECTURE, OnnxGraph
    from tapml.graph_plan import build_graph_plan
    from tapml.weights import save_shards

    if options.quantization != "q0f32":
        raise CompileError(f"ONNX graphs compile with their weights as stored (q0f32), not "
                           f"{options.quantization}")  # fmt: skip
    graph = OnnxGraph.open(path)
    entries = graph.entries(options.input_shapes)
    meta = {"architecture": GRAPH_ARCHITECTURE, "quantization": "q0f32", "dtype": "float32",
            "row_splits": {}}  # fmt: skip
    kernels, plan, weights = build_graph_plan(graph, entries, meta)
    plan.save(work.plan_file)
    if not (work.weights_dir / "index.json").is_file():
        save_shards(weights.items(), work.weights_dir, progress=progress)
    model = {"source": path.name, "architecture": GRAPH_ARCHITECTURE, "inputs": graph.inputs,
             "outputs": graph.outputs, "metadata": graph.metadata}  # fmt: skip
    stored = {"matrices": len(weights), "parameters": sum(int(v.size) for v in weights.values()),
              "bytes": sum(int(v.nbytes) for v in weights.values())}  # fmt: skip
    return kernels, plan, {"model": model, "weights": {"formats": {"float32": stored}}}


def model_formats(arch: Architecture, config: Any, quant: Quantization,
                  stored: Mapping[str, tuple[str, ...]] | None = None
                  ) -> dict[str, tuple[WeightFormat, ...]]:  # fmt: skip
    """Each matrix's formats under `quant`, its parts stored as `stored` says (float32 where
    not given: what re-quantizing schemes and float sources see)."""
    if stored is None:
        stored = {name: ("F32",) * n for name, n in arch.matrix_parts(config).items()}
    return quant.formats(stored)


def build_plan(arch: Architecture, config: Any, quant: Quantization, options: CompileOptions,
               formats: Mapping[str, tuple[WeightFormat, ...]] | None = None
               ) -> tuple[Any, Plan, Any]:  # fmt: skip
    """(module, plan, fused Relax module) of the architecture's model; `formats` (see
    `model_formats`) by default as re-quantized from float weights."""
    from tapml.lower import extract_plan, fuse
    from tapml.nn.bindings import split_bindings

    formats = dict(formats) if formats is not None else model_formats(arch, config, quant)
    module = arch.module(config, ModuleOptions(quant.dtype, formats, options.max_context,
                                               options.chunk, options.kv_cache,
                                               options.buckets))  # fmt: skip
    row_splits = split_bindings(module, options.max_binding)
    mod, named = module.export_tvm(spec=module.export_spec())
    fused = fuse(mod, list(module.export_spec()))
    meta = {
        "architecture": arch.name, "quantization": quant.name, "dtype": quant.dtype,
        "kv_cache": options.kv_cache, "max_context": options.max_context,
        "chunk": options.chunk, "weight_formats": format_names(formats),
        "row_splits": row_splits,
    }  # fmt: skip
    plan = extract_plan(fused, [n for n, _ in named], module.state_names(), meta, module.task())
    return module, plan, fused


def _every_param(params: Iterable[tuple[str, np.ndarray]], tables: Mapping[str, np.ndarray],
                 param_names: list[str], row_splits: Mapping[str, list[int]]
                 ) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """The converted weights (split into row ranges where `row_splits` says), then the
    computed tables; every parameter the plan names must come."""
    produced = set()
    for name, array in split_rows(itertools.chain(params, tables.items()), row_splits):
        produced.add(name)
        yield name, array
    missing = set(param_names) - produced
    if missing:
        raise CompileError(
            f"the weights lack {len(missing)} parameters the model needs: {sorted(missing)[:5]}"
        )


def calibrate(arch: Architecture, sources, config: Any, tokenizer: Tokenizer):
    """Activation importance of every weight matrix, from the float model on calibration text."""
    from tapml.calibration import CALIBRATION_TEXT, activation_importance
    from tapml.convert import float_weights

    tokens = tokenizer.encode(CALIBRATION_TEXT)
    log.info("calibrating quantization on %d tokens", len(tokens))
    weights = float_weights(sources, arch.weight_map(config))
    return activation_importance(arch.reference, weights, config, tokens)
