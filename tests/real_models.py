"""What the real-model tests of each architecture share: an engine per target, agreement with
llama.cpp's greedy steps, and a carved suite replayed on a target."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tapml.api import ensure_compiled
from tapml.artifact import describe
from tapml.bench import forced_logits, import_llama_cpp, llama_cpp_greedy, top2_margin
from tapml.carving import carve as carving
from tapml.carving.scenarios import Scenario
from tapml.cli import main
from tapml.models import get_architecture
from tapml.quantization import dequantize_params
from tapml.runtime.engine import Engine
from tapml.targets import TARGETS, executes_here
from tapml.weights import load_shards


def reference_build(model: str, target: str, **options) -> Path:
    """`model` compiled for `target` as targets are compared: a float32 KV cache (one plan for
    every target) and float32 arithmetic (`reference_options`), unless compile `options`
    (ensure_compiled's) say otherwise."""
    options = {"kv_cache": "float32", "target_options": TARGETS[target].reference_options(),
               "progress": False, **options}
    return ensure_compiled(model, target, **options)


def engine_on(model: str, target: str, **options) -> Engine:
    """An engine of `reference_build(model, target, **options)`, where `target` executes."""
    ok, why = executes_here(TARGETS[target])
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")
    return Engine(reference_build(model, target, **options))


def open_llama_cpp(gguf: Path) -> Iterator:
    """llama.cpp on the same GGUF, keeping every position's logits (a fixture's body)."""
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, n_threads=2,
                          verbose=False)  # fmt: skip
    yield llm
    llm.close()


def reference(engine: Engine, tokens: list[int], **changes) -> np.ndarray:
    """The architecture's numpy forward pass over the artifact's own weights (dequantized as
    its kernels read them), its config changed as asked, its KV cache rounded as the
    artifact's."""
    config = describe(engine.artifact)["model"]
    arch = get_architecture(config["architecture"])
    weights = dequantize_params(load_shards(engine.artifact / "weights"),
                                engine.plan.model["weight_formats"])  # fmt: skip
    config = dataclasses.replace(arch.config.from_dict(config), **changes)
    return arch.reference(weights, config, tokens, kv_cache=engine.plan.model["kv_cache"])


def relative_errors(got: np.ndarray, want: np.ndarray) -> list[float]:
    """Per step: max |got - want| / max |want|."""
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want, strict=True)]


def assert_follows_llama_cpp(engine: Engine, llm, prompts: list[str], steps: int,
                             margin: float) -> None:  # fmt: skip
    """Fed llama.cpp's own greedy continuation of each prompt, the engine picks llama.cpp's
    token at every step where llama.cpp's top two logits are over `margin` apart, and at 95%
    of all steps."""
    agree = total = 0
    partings = []
    for prompt in prompts:
        ids = engine.tokenizer.encode(prompt)
        theirs, tokens = llama_cpp_greedy(llm, ids, steps)
        ours = forced_logits(engine, ids, tokens).argmax(axis=-1)
        for step, (mine, want, gap) in enumerate(zip(ours, tokens, top2_margin(theirs),
                                                     strict=True)):  # fmt: skip
            total += 1
            agree += int(mine == want)
            if mine != want:
                partings.append((prompt[:20], step, float(gap)))
    assert all(gap <= margin for *_, gap in partings), partings
    assert agree >= 0.95 * total, partings


def assert_carved_suite_passes(engine: Engine, model: str, scenario: Scenario, target: str,
                               directory: Path) -> None:  # fmt: skip
    """Unit tests carved from `scenario` on the engine's artifact replay on `target`, every
    kernel of the model among them."""
    suite = directory / "suite"
    carving.carve(engine.artifact, suite, [scenario], model, progress=False)
    result = CliRunner().invoke(main, ["-q", "test", str(suite), "--target", target])
    assert result.exit_code == 0, result.output
    report = json.loads((suite / "reports" / target / "report.json").read_text())
    assert report["passed"]
    assert {k["kernel"] for k in report["kernels"]} == set(engine.plan.kernels)
