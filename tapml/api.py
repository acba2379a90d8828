"""The Python API the CLI is built on: `tapml.load(model).generate(prompt)`."""

from __future__ import annotations

import logging
from pathlib import Path

from .artifact import Artifact
from .compiler import CompileOptions, compile_model
from .errors import TapmlError

log = logging.getLogger("tapml")


def load(
    model: str | Path,
    target: str = "llvm",
    quantization: str | None = None,
    max_context: int | None = None,
    chunk: int | None = None,
    progress: bool = True,
):
    """A compiled artifact directory, a model name, a GGUF path or a checkpoint, ready to run:
    an Engine that generates for a causal LM, an Embedder whose `embed(texts)` gives a numpy
    array of unit vectors for an embedding model.

    Names and model files are converted and compiled on first use and cached (see `tapml
    cache`).
    """
    from tapml.runtime.engine import load_runtime

    return load_runtime(
        artifact_for(str(model), target, quantization, max_context, chunk, progress=progress)
    )


# the three graphs `tapml ocr` runs: detector, orientation classifier, recognizer
OCR_MODELS = ("pp-ocrv4-det", "pp-ocr-cls", "pp-ocrv4-rec")


def load_ocr(target: str = "llvm", progress: bool = True,
             models: tuple[str, str, str] = OCR_MODELS):  # fmt: skip
    """PP-OCR ready to read images (`OcrPipeline.read`), its three graphs compiled for `target`
    (cached) at their model cards' shapes; `models` may name other cards or artifacts."""
    from tapml.runtime.graph import GraphRunner
    from tapml.runtime.ocr import OcrPipeline

    detector, classifier, recognizer = (GraphRunner(artifact_for(m, target, progress=progress))
                                        for m in models)  # fmt: skip
    characters = recognizer.metadata.get("character")
    if characters is None:
        raise TapmlError(f"{recognizer.artifact} has no character list (ONNX metadata "
                         "'character'): it is not a PP-OCR recognizer")  # fmt: skip
    return OcrPipeline(detector, classifier, recognizer, characters.splitlines())


def artifact_for(
    model: str,
    target: str = "llvm",
    quantization: str | None = None,
    max_context: int | None = None,
    chunk: int | None = None,
    target_options: dict[str, str] | None = None,
    progress: bool = True,
    kv_cache: str | None = None,
    buckets: tuple[tuple[int, int], ...] | None = None,
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = (),
) -> Path:
    """`model` itself if it is a compiled artifact directory, else its cached build."""
    if Artifact.is_artifact(model):
        return Path(model)
    return ensure_compiled(
        model, target, quantization, max_context, chunk, target_options, progress, kv_cache,
        buckets, input_shapes,
    )


def ensure_compiled(
    model: str,
    target: str = "llvm",
    quantization: str | None = None,
    max_context: int | None = None,
    chunk: int | None = None,
    target_options: dict[str, str] | None = None,
    progress: bool = True,
    kv_cache: str | None = None,
    buckets: tuple[tuple[int, int], ...] | None = None,
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = (),
) -> Path:
    """The cached artifact for these settings, compiling it first if the cache lacks it (an
    ONNX graph at `input_shapes`, by default its model card's)."""
    from tapml.models import default_input_shapes, resolve_gguf

    name, gguf_path = resolve_gguf(model)
    options = CompileOptions.resolve(target, quantization, max_context, chunk, target_options,
                                     kv_cache, buckets=buckets, source=gguf_path,
                                     input_shapes=input_shapes or default_input_shapes(model)
                                     )  # fmt: skip
    return compiled(name, gguf_path, options, progress)


def compiled(name: str, gguf_path: Path, options: CompileOptions, progress: bool = True) -> Path:
    """The cached artifact of `gguf_path` (shown as `name`) for `options`, compiled first if
    the cache lacks it."""
    from tapml.cache import entry_dir, entry_lock

    artifact = entry_dir(name, gguf_path, options)
    with entry_lock(artifact):  # another process may be compiling the same entry
        cached = Artifact(artifact)
        if not cached.complete(options.target):
            if artifact.exists():
                log.warning("the cached build %s is incomplete: compiling it again", artifact)
        elif changed := cached.changed():
            log.warning("the cached build %s is damaged (%s): compiling it again", artifact,
                        "; ".join(changed))  # fmt: skip
        else:
            log.info("using the cached build %s", artifact)
            return artifact
        log.info("compiling %s for %s (%s); cached in %s", name, options.target,
                 options.quantization, artifact)  # fmt: skip
        return compile_model(gguf_path, artifact, options, progress=progress)
