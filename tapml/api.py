"""The Python API the CLI is built on: `tapml.load(model).generate(prompt)`."""

from __future__ import annotations

import logging
from pathlib import Path

from .compiler import CONFIG_FILE, CompileOptions, compile_model

log = logging.getLogger("tapml")


def load(
    model: str | Path,
    target: str = "llvm",
    quantization: str | None = None,
    max_context: int | None = None,
    chunk: int | None = None,
    progress: bool = True,
):
    """A ready-to-generate Engine for a compiled artifact directory, a model name or a GGUF path.

    Names and GGUF files are converted and compiled on first use and cached (see `tapml cache`).
    """
    from tapml.runtime.engine import Engine

    return Engine(
        artifact_for(str(model), target, quantization, max_context, chunk, progress=progress)
    )


def artifact_for(
    model: str,
    target: str = "llvm",
    quantization: str | None = None,
    max_context: int | None = None,
    chunk: int | None = None,
    target_options: dict[str, str] | None = None,
    progress: bool = True,
    kv_cache: str | None = None,
) -> Path:
    """`model` itself if it is a compiled artifact directory, else its cached build."""
    if (Path(model) / CONFIG_FILE).is_file():
        return Path(model)
    return ensure_compiled(
        model, target, quantization, max_context, chunk, target_options, progress, kv_cache
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
) -> Path:
    """The cached artifact for these settings, compiling it first if the cache lacks it."""
    from tapml.cache import entry_dir, entry_lock
    from tapml.models import resolve_gguf

    name, gguf_path = resolve_gguf(model)
    options = CompileOptions(
        target=target,
        quantization=quantization,
        target_options=dict(target_options or {}),
        kv_cache=kv_cache,
        **{k: v for k, v in {"max_context": max_context, "chunk": chunk}.items() if v},
    ).resolved()
    artifact = entry_dir(name, gguf_path, options)
    with entry_lock(artifact):  # another process may be compiling the same entry
        if _complete(artifact, target):
            log.info("using the cached build %s", artifact)
            return artifact
        if artifact.exists():
            log.warning("the cached build %s is incomplete: compiling it again", artifact)
        log.info("compiling %s for %s (%s); cached in %s", name, target, options.quantization,
                 artifact)  # fmt: skip
        return compile_model(gguf_path, artifact, options, progress=progress)


def _complete(artifact: Path, target: str) -> bool:
    from tapml.targets import get_target

    needed = [CONFIG_FILE, "plan.json", "weights/index.json", "tokenizer/tokenizer.json",
              get_target(target).kernels]  # fmt: skip
    return all((artifact / name).is_file() for name in needed)
