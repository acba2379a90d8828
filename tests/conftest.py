"""Shared fixtures: a tiny random GGUF for fast tests, and the real SmolLM2 compiled once per run.

Real-model artifacts go through the same compile cache as `tapml run` (~/.cache/tapml, or
$TAPML_CACHE_DIR), keyed by everything that determines them, so a second run reuses them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_gguf import write_tiny_gguf  # noqa: E402

from tapml.compiler import CompileOptions, compile_model  # noqa: E402

TINY_CONTEXT, TINY_CHUNK = 64, 8
PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]
LLAMA_CPP_GREEDY = [7042, 30, 198, 198, 504]  # " Paris.\n\nThe", from llama.cpp on the same GGUF


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_gguf, tmp_path_factory):
    """tiny_artifact(quantization) -> the tiny model compiled once per quantization."""
    built: dict[str, Path] = {}

    def get(quantization: str = "q4f32_1") -> Path:
        if quantization not in built:
            out = tmp_path_factory.mktemp("tiny") / quantization
            options = CompileOptions("llvm", quantization, TINY_CONTEXT, TINY_CHUNK)
            built[quantization] = compile_model(tiny_gguf, out, options, progress=False)
        return built[quantization]

    return get


@pytest.fixture(scope="session")
def real_artifact():
    """real_artifact(quantization) -> SmolLM2-135M compiled for llvm (cached across runs)."""
    from tapml.api import ensure_compiled

    return lambda quantization: ensure_compiled("smollm2-135m", "llvm", quantization)
