"""Shared fixtures: tiny random GGUFs for fast tests (float32 weights, and every GGUF block type
kept as stored), and the real SmolLM2 compiled once per run.

Real-model artifacts go through the same compile cache as `tapml run` (~/.cache/tapml, or
$TAPML_CACHE_DIR), keyed by everything that determines them, so a second run reuses them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_gguf import write_tiny_gguf, write_tiny_stored_gguf  # noqa: E402

from tapml.compiler import CompileOptions, compile_model  # noqa: E402
from tapml.quantization import QUANTIZATION  # noqa: E402
from tapml.targets import TARGETS  # noqa: E402

TINY_CONTEXT, TINY_CHUNK = 64, 8
PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]
LLAMA_CPP_GREEDY = [7042, 30, 198, 198, 504]  # " Paris.\n\nThe", from llama.cpp on the same GGUF


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_gguf, tmp_path_factory):
    """tiny_artifact(quantization, target, kv_cache) -> the tiny model, compiled once per
    setting per run. The KV cache defaults to the activations' dtype on every target, so that
    llvm and the others share one plan, and llvm computes in float32 as they do
    (`reference_options`: carving, offloading, comparing)."""
    built: dict[tuple[str, str, str | None], Path] = {}

    def get(quantization: str = "q4f32_1", target: str = "llvm", kv_cache: str | None = None
            ) -> Path:  # fmt: skip
        key = (quantization, target, kv_cache)
        if key not in built:
            out = tmp_path_factory.mktemp(target) / quantization
            kv_cache_dtype = kv_cache or QUANTIZATION[quantization].dtype
            options = CompileOptions.resolve(target, quantization, TINY_CONTEXT, TINY_CHUNK,
                                             kv_cache=kv_cache_dtype,
                                             target_options=TARGETS[target].reference_options())
            built[key] = compile_model(tiny_gguf, out, options, progress=False)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_stored_gguf(tmp_path_factory) -> Path:
    return write_tiny_stored_gguf(tmp_path_factory.mktemp("gguf") / "tiny-stored.gguf")


@pytest.fixture(scope="session")
def tiny_stored_artifact(tiny_stored_gguf, tmp_path_factory):
    """tiny_stored_artifact(target) -> the tiny model of every block type, kept as stored
    (gguf), float32 KV cache and arithmetic (`reference_options`), compiled once per target
    per run."""
    built: dict[str, Path] = {}

    def get(target: str = "llvm") -> Path:
        if target not in built:
            options = CompileOptions.resolve(target, "gguf", TINY_CONTEXT, TINY_CHUNK,
                                             kv_cache="float32",
                                             target_options=TARGETS[target].reference_options())
            out = tmp_path_factory.mktemp(target) / "stored"
            built[target] = compile_model(tiny_stored_gguf, out, options, progress=False)
        return built[target]

    return get


@pytest.fixture
def hashed(tmp_path, monkeypatch):
    """The names of the files tapml.checksums hashes from now on, with an empty cache (so
    nothing is remembered yet)."""
    from tapml import checksums

    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "cache"))
    names: list[str] = []
    real = checksums.file_sha256

    def spy(path, *args):
        names.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(checksums, "file_sha256", spy)
    return names


def rewrite(path: Path, data: bytes) -> None:
    """Replace the file at `path` by a new one holding `data`: a new inode, so that its stamp
    differs even within one tick of the file system's clock."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.replace(new, path)


def bench_module(name: str):
    """The benchmark script bench/NAME.py as a module (tests run short versions of them)."""
    import importlib.util

    path = Path(__file__).parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def greedy_trace(engine, prompt_ids: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Logits after the prompt and after each greedy decode step, and the greedy ids."""
    engine.reset()
    logits, ids = [engine.prefill(prompt_ids)], []
    for _ in range(steps):
        ids.append(int(np.argmax(logits[-1])))
        logits.append(engine.decode(ids[-1]))
    return logits, ids


def assert_close(got: list[np.ndarray], want: list[np.ndarray], rtol: float) -> None:
    """Each step's max |got - want| / max |want| is within rtol."""
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        error = float(np.abs(a - b).max() / np.abs(b).max())
        assert error <= rtol, f"step {step}: relative error {error:.2e} > {rtol}"


@pytest.fixture(scope="session")
def real_artifact():
    """real_artifact(quantization, kv_cache) -> SmolLM2-135M compiled for llvm (cached across
    runs) as other targets are compared with: the KV cache in the activations' dtype unless
    named (the plan every target shares), float32 arithmetic (`reference_options`)."""
    from tapml.api import ensure_compiled

    def get(quantization: str, kv_cache: str | None = None) -> Path:
        kv_cache = kv_cache or QUANTIZATION[quantization].dtype
        return ensure_compiled("smollm2-135m", "llvm", quantization, kv_cache=kv_cache,
                               target_options=TARGETS["llvm"].reference_options())

    return get


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B's GGUF, joined from its six part packages once (then cached)."""
    from tapml.models import MODELS

    return MODELS["qwen2.5-coder-0.5b"].gguf_path()


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma-3-270M's GGUF, joined from its four part packages once (then cached)."""
    from tapml.models import MODELS

    return MODELS["gemma3-270m"].gguf_path()


@pytest.fixture(scope="session")
def minilm_artifact():
    """minilm_artifact(target) -> all-MiniLM-L6-v2 compiled for `target` with the default
    buckets and quantization (q0f32), cached across runs."""
    from tapml.api import ensure_compiled

    def get(target: str = "llvm") -> Path:
        return ensure_compiled("all-minilm-l6-v2", target, progress=False)

    return get


def open_page(browser, page: str, ready: str) -> None:
    """Open `page` of the browser's site and await `ready` (a JavaScript expression whose
    value settles once the bundle has loaded); a bundle that does not load fails the test
    with the page's console."""
    browser.open(page)
    try:
        browser.evaluate(f"(async () => {ready})()")
    except Exception as e:
        console = "\n".join(browser.console())
        raise AssertionError(f"the bundle did not load: {e}\n{console}") from e
