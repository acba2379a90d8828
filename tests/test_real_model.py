"""SmolLM2-135M end to end on the CPU: against llama.cpp's tokens, numpy and the Relax VM."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import LLAMA_CPP_GREEDY, PROMPT, PROMPT_IDS

from tapml.artifact import describe
from tapml.compiler import CompileOptions, build_plan
from tapml.models import ARCHITECTURES
from tapml.models.llama import reference
from tapml.models.llama.config import LlamaConfig
from tapml.quantization import QUANTIZATION, dequantize_params
from tapml.runtime.engine import Engine
from tapml.weights import load_shards

pytestmark = pytest.mark.real_model

# Max |difference| / max |reference logit| for float32 activations. The numpy pass runs in
# float64 on the same (dequantized) weights; the kernels accumulate in float32.
NUMPY_TOLERANCE = 1e-3
VM_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def engines(real_artifact):
    """By quantization: the KV cache in the activations' dtype, and "q4f32_1+f16kv" with
    llvm's default float16 cache."""
    built = {q: Engine(real_artifact(q)) for q in ("q0f32", "q4f32_1")}
    return {**built, "q4f32_1+f16kv": Engine(real_artifact("q4f32_1", "float16"))}


def test_q0f32_greedy_tokens_equal_llama_cpp(engines):
    tokens = list(engines["q0f32"].generate_ids(PROMPT_IDS, max_tokens=len(LLAMA_CPP_GREEDY)))
    assert tokens == LLAMA_CPP_GREEDY


@pytest.mark.parametrize("build", ["q4f32_1", "q4f32_1+f16kv"])
def test_q4f32_1_says_paris(engines, build):
    engine = engines[build]
    assert engine.tokenizer.encode(PROMPT) == PROMPT_IDS
    tokens = list(engine.generate_ids(PROMPT_IDS, max_tokens=len(LLAMA_CPP_GREEDY)))
    assert tokens[0] == LLAMA_CPP_GREEDY[0]  # " Paris"
    assert engine.tokenizer.decode(tokens).startswith(" Paris")


@pytest.mark.parametrize("build", ["q0f32", "q4f32_1", "q4f32_1+f16kv"])
def test_logits_match_numpy_forward_pass(engines, build):
    engine = engines[build]
    config = LlamaConfig.from_dict(describe(engine.artifact)["model"])
    weights = dequantize_params(load_shards(engine.artifact / "weights"),
                                engine.plan.model["weight_formats"])  # fmt: skip
    tokens = PROMPT_IDS + LLAMA_CPP_GREEDY[:3]
    # the reference rounds keys and values as the artifact's KV cache stores them
    expected = reference.forward(weights, config, tokens, kv_cache=engine.plan.model["kv_cache"])
    engine.reset()
    got = [engine.prefill(PROMPT_IDS)] + [engine.decode(t) for t in LLAMA_CPP_GREEDY[:3]]
    for step, logits in enumerate(got):
        ref = expected[len(PROMPT_IDS) - 1 + step]
        error = np.abs(logits - ref).max() / np.abs(ref).max()
        assert error < NUMPY_TOLERANCE, f"step {step}: relative error {error:.2e}"


def test_plan_matches_relax_vm_on_the_same_module(engines):
    from tapml.targets.relax_vm import RelaxVM

    engine = engines["q4f32_1+f16kv"]
    config = LlamaConfig.from_dict(describe(engine.artifact)["model"])
    options = CompileOptions.resolve(**describe(engine.artifact)["options"])
    _, plan, fused = build_plan(ARCHITECTURES["llama"], config, QUANTIZATION["q4f32_1"], options)
    vm = RelaxVM(fused, plan, load_shards(engine.artifact / "weights"))
    tokens = np.zeros(options.chunk, "int32")
    tokens[: len(PROMPT_IDS)] = PROMPT_IDS
    expected = vm.run("prefill", {"pos": 0, "n_valid": len(PROMPT_IDS)},
                      {"prefill.tokens": tokens})[0]  # fmt: skip
    # the plan's prefill entry, as the VM runs it (Engine.prefill decodes a prompt this short
    # token by token on llvm)
    engine.reset()
    got = engine.executor.run(*engine.task.prefill(0, PROMPT_IDS))[0]
    engine.rewind(len(PROMPT_IDS))
    assert np.abs(got - expected).max() / np.abs(expected).max() < VM_TOLERANCE
    step = vm.run("decode", {"pos": len(PROMPT_IDS)}, {"decode.token": np.array([7042], "int32")})
    assert np.abs(engine.decode(7042) - step[0]).max() / np.abs(step).max() < VM_TOLERANCE


def test_cli_run_streams_the_paris_completion(engines):
    artifact = engines["q4f32_1+f16kv"].artifact
    result = subprocess.run(
        [sys.executable, "-m", "tapml", "-q", "run", str(artifact), "--prompt", PROMPT,
         "--max-tokens", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" Paris")
    assert "decode" in result.stderr and "tok/s" in result.stderr
