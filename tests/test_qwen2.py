"""Qwen2.5-Coder-0.5B, the second architecture: its tokenizer and greedy steps against llama.cpp
on the same GGUF, its logits against the numpy forward pass on llvm, and WebGPU's and OpenCL's
against llvm's. Its Q8_0 output matrix is over WebGPU's binding limit, so every one of these
runs it split (tests/test_bindings.py proves the split alone)."""

from __future__ import annotations

import pytest
from real_models import (
    assert_carved_suite_passes,
    assert_follows_llama_cpp,
    engine_on,
    open_llama_cpp,
    reference,
    relative_errors,
)

from tapml.bench import forced_logits, greedy_run
from tapml.carving.scenarios import Scenario

pytestmark = pytest.mark.real_model

MODEL = "qwen2.5-coder-0.5b"
# max |difference| / max |reference| per logits vector, float32 activations and KV cache: the
# numpy pass in float64 on the same weights; GPUs sum in other orders than llvm
NUMPY_RTOL = 1e-3
GPU_RTOL = 2e-3
# --target-option prefill=int8 decode=int8: the matmuls' activations in int8, one scale per 32
# values (as llama.cpp's Q8); the decode steps read the keys and values that prefill wrote
INT8_RTOL = 3e-2
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


@pytest.fixture(scope="module")
def llvm():
    return engine_on(MODEL, "llvm")


@pytest.fixture(scope="module")
def llama(qwen_gguf):
    yield from open_llama_cpp(qwen_gguf)


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
    assert "lm_head" in llvm.plan.model["row_splits"]
    prompt = llvm.tokenizer.encode(PROMPTS[0])
    logits, tokens = greedy_run(llvm, prompt, 3)
    errors = relative_errors(logits, reference(llvm, prompt + tokens[:-1])[len(prompt) - 1 :])
    assert max(errors) < NUMPY_RTOL, errors


@pytest.mark.parametrize("target", ["webgpu", "opencl"])
def test_gpu_logits_equal_llvms(llvm, target):
    prompt = llvm.tokenizer.encode(PROMPTS[0])
    want, tokens = greedy_run(llvm, prompt, 3)
    errors = relative_errors(forced_logits(engine_on(MODEL, target), prompt, tokens), want)
    assert max(errors) < GPU_RTOL, errors


def test_argmax_follows_llama_cpps_greedy_steps(llvm, llama):
    assert_follows_llama_cpp(llvm, llama, PROMPTS, STEPS, LLAMA_CPP_MARGIN)


def test_int8_activations_follow_the_numpy_forward_pass_and_llama_cpp(llama):
    engine = engine_on(MODEL, "llvm", target_options={"prefill": "int8", "decode": "int8"})
    long = [p for p in PROMPTS if len(engine.tokenizer.encode(p)) > engine.chunk // 4]
    prompt = engine.tokenizer.encode(long[0])  # prefilled, not decoded token by token
    logits, tokens = greedy_run(engine, prompt, 3)
    errors = relative_errors(logits, reference(engine, prompt + tokens[:-1])[len(prompt) - 1 :])
    assert 1e-4 < max(errors) < INT8_RTOL, errors  # quantized, and only so much
    assert_follows_llama_cpp(engine, llama, long, STEPS, LLAMA_CPP_MARGIN)


def test_a_carved_suite_passes_on_webgpu(llvm, tmp_path):
    chat = Scenario("chat", "a coding question", "Write a Python function that adds two numbers.",
                    decode_steps=4)  # fmt: skip
    assert_carved_suite_passes(llvm, MODEL, chat, "webgpu", tmp_path)
