"""Qwen2.5-Coder-0.5B, the second architecture: its tokenizer and greedy steps against llama.cpp
on the same GGUF, its logits against the numpy forward pass on llvm, and WebGPU's and OpenCL's
against llvm's. Its Q8_0 output matrix is over WebGPU's binding limit, so every one of these
runs it split (tests/test_bindings.py proves the split alone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tapml.api import ensure_compiled
from tapml.artifact import describe
from tapml.bench import forced_logits, import_llama_cpp, top2_margin
from tapml.carving import carve as carving
from tapml.carving.scenarios import Scenario
from tapml.cli import main
from tapml.models import get_architecture
from tapml.quantization import dequantize_params
from tapml.runtime.engine import Engine
from tapml.targets import TARGETS, executes_here
from tapml.weights import load_shards

pytestmark = pytest.mark.real_model

MODEL = "qwen2.5-coder-0.5b"
# max |difference| / max |reference| per logits vector, float32 activations and KV cache: the
# numpy pass in float64 on the same weights; GPUs sum in other orders than llvm
NUMPY_RTOL = 1e-3
GPU_RTOL = 2e-3
LLAMA_CPP_MARGIN = 1.5  # llama.cpp computes in its own order and precision (Q8 activations)
STEPS = 16
PROMPTS = [
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWrite a SQL query that counts rows.<|im_end|>\n<|im_start|>assistant\n",
    "// binary search in C\nint search(int *a, int n, int x) {",
    "The capital of France is",
]
TEXTS = [
    "def f(x):\n    return x  + 1\n\n\n",
    "    if (a&&b) { x->y = \"str\"; }\r\n\tindent\t\ttabs",
    "12345 3.14159 1,000,000 0x1F 2e-10",
    "héllo wörld 你好世界 🤖 naïve café – “quotes” …",
    "   leading and trailing   \n\n\t\t  \n",
    "I'm you'RE they'll DON'T",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "<|fim_prefix|>a = <|fim_suffix|>\n<|fim_middle|>",
]


def engine_on(target: str) -> Engine:
    ok, why = executes_here(TARGETS[target])
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")
    return Engine(ensure_compiled(MODEL, target, kv_cache="float32", progress=False))


@pytest.fixture(scope="module")
def llvm() -> Engine:
    return engine_on("llvm")


@pytest.fixture(scope="module")
def llama(qwen_gguf):
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(qwen_gguf), n_ctx=256, logits_all=True, n_threads=2,
                          verbose=False)  # fmt: skip
    yield llm
    llm.close()


def test_tokens_equal_llama_cpps(llvm, llama):
    tokenizer = llvm.tokenizer
    assert (tokenizer.add_bos, tokenizer.eos_id) == (False, 151645)  # <|im_end|>
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == llama.tokenize(text.encode(), add_bos=False, special=True), text
        assert tokenizer.decode(ids) == text


def test_chat_template_is_chatml(llvm):
    text = llvm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" in text


def test_logits_equal_the_numpy_forward_pass(llvm):
    config = describe(llvm.artifact)
    arch = get_architecture(config["model"]["architecture"])
    weights = dequantize_params(load_shards(llvm.artifact / "weights"),
                                llvm.plan.model["weight_formats"])  # fmt: skip
    assert "lm_head" in llvm.plan.model["row_splits"]
    prompt = llvm.tokenizer.encode(PROMPTS[0])
    logits, tokens = greedy(llvm, prompt, 3)
    want = arch.reference(weights, arch.config.from_dict(config["model"]), prompt + tokens[:-1],
                          kv_cache="float32")[len(prompt) - 1 :]  # fmt: skip
    for step, (a, b) in enumerate(zip(logits, want, strict=True)):
        error = np.abs(a - b).max() / np.abs(b).max()
        assert error < NUMPY_RTOL, f"step {step}: relative error {error:.2e}"


@pytest.mark.parametrize("target", ["webgpu", "opencl"])
def test_gpu_logits_equal_llvms(llvm, target):
    prompt = llvm.tokenizer.encode(PROMPTS[0])
    want, tokens = greedy(llvm, prompt, 3)
    got = forced_logits(engine_on(target), prompt, tokens)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        error = np.abs(a - b).max() / np.abs(b).max()
        assert error < GPU_RTOL, f"step {step}: relative error {error:.2e}"


def test_argmax_follows_llama_cpps_greedy_steps(llvm, llama):
    """Fed llama.cpp's own greedy continuation, tapml picks llama.cpp's token at every step
    where llama.cpp's top two logits are over 1.5 apart, and at 95% of all steps."""
    agree = total = 0
    partings = []
    for prompt in PROMPTS:
        ids = llvm.tokenizer.encode(prompt)
        theirs, tokens = llama_cpp_greedy(llama, ids, STEPS)
        ours = forced_logits(llvm, ids, tokens).argmax(axis=-1)
        for step, (mine, want, margin) in enumerate(zip(ours, tokens, top2_margin(theirs),
                                                        strict=True)):  # fmt: skip
            total += 1
            agree += int(mine == want)
            if mine != want:
                partings.append((prompt[:20], step, float(margin)))
    assert all(margin <= LLAMA_CPP_MARGIN for *_, margin in partings), partings
    assert agree >= 0.95 * total, partings


def test_a_carved_suite_passes_on_webgpu(llvm, tmp_path):
    """Unit tests carved from a chat on llvm, every kernel of the model, replayed on WebGPU."""
    suite = tmp_path / "suite"
    chat = Scenario("chat", "a coding question", "Write a Python function that adds two numbers.",
                    decode_steps=4)  # fmt: skip
    carving.carve(llvm.artifact, suite, [chat], MODEL, progress=False)
    result = CliRunner().invoke(main, ["-q", "test", str(suite), "--target", "webgpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((suite / "reports" / "webgpu" / "report.json").read_text())
    assert report["passed"]
    assert {k["kernel"] for k in report["kernels"]} == set(llvm.plan.kernels)


def greedy(engine: Engine, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """The logits predicting each of `steps` greedy tokens, and the tokens."""
    engine.reset()
    logits, tokens = [engine.prefill(prompt)], []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(engine.decode(tokens[-1]))
    return np.stack(logits[:-1]), tokens


def llama_cpp_greedy(llm, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits predicting each of its `steps` greedy tokens, and the tokens."""
    llm.reset()
    llm.eval(prompt)
    logits, tokens = [], []
    for _ in range(steps):
        logits.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
        tokens.append(int(np.argmax(logits[-1])))
        llm.eval([tokens[-1]])
    return np.stack(logits), tokens
