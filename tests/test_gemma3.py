"""Gemma-3-270M, the architecture with what llama lacks: its SentencePiece ids and greedy steps
against llama.cpp on the same GGUF, its logits against the numpy forward pass across position
512 (where the sliding window starts to drop positions) on llvm, WebGPU's and OpenCL's against
llvm's, float32 activations everywhere, and the sliding window's exact reach on a tiny model."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from real_models import (
    assert_carved_suite_passes,
    assert_follows_llama_cpp,
    engine_on,
    open_llama_cpp,
    reference,
    reference_build,
    relative_errors,
)
from tiny_gguf import write_tiny_gemma3_gguf

from tapml.artifact import describe
from tapml.bench import forced_logits, greedy_run
from tapml.carving.scenarios import Scenario
from tapml.compiler import CompileOptions, compile_model
from tapml.models import get_architecture
from tapml.plan import Plan
from tapml.runtime.engine import Engine
from tapml.runtime.grammar import BACKENDS, make_constraint
from tapml.targets import TARGETS, executes_here
from tapml.tokenizer import Tokenizer

MODEL = "gemma3-270m"
NUMPY_RTOL = 1e-3  # float32 kernels against float64 numpy on the same weights
GPU_RTOL = 2e-3
LLAMA_CPP_MARGIN = 1.5
STEPS = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, there was",
           "Les fleurs du jardin sont"]  # fmt: skip
TEXTS = [
    "The capital of France is",
    "def f(x):\n    return x  + 1\n\n\n",
    "12345 3.14159 1,000,000 0x1F 2e-10",
    "héllo wörld 你好世界 🤖 naïve café – “quotes” …",
    "   leading and trailing   \n\n\t\t  \n",
    "<start_of_turn>user\nHi<end_of_turn>\n<div></iframe>",
    "ẞ ǅ ﬁ \u00a0nbsp \u200bzw 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃\x01\x7f",
]


@pytest.fixture(scope="module")
def llvm() -> Engine:
    return engine_on(MODEL, "llvm")


@pytest.fixture(scope="module")
def llama(gemma_gguf):
    yield from open_llama_cpp(gemma_gguf)


@pytest.mark.real_model
def test_sentencepiece_ids_equal_llama_cpps(llvm, llama):
    tokenizer = llvm.tokenizer
    assert (tokenizer.add_bos, tokenizer.bos_id) == (True, 2)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == llama.tokenize(text.encode(), add_bos=True, special=True), text
        assert tokenizer.decode(ids[1:]) == text


@pytest.mark.real_model
def test_sentencepiece_ids_equal_llama_cpps_on_code_prose_and_random_text(llvm, llama):
    """tapml's own SentencePiece encoder (tapml/sentencepiece.py) on long and odd texts."""
    rng = random.Random(0)
    ranges = [(32, 126), (0x80, 0x2FFF), (0x3000, 0x9FFF), (0x1F300, 0x1FAFF), (9, 10)]
    texts = [Path(__file__).read_text(), (Path(__file__).parent.parent / "README.md").read_text()]
    texts += ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 80)))
              for _ in range(200)]  # fmt: skip
    for text in texts:
        assert llvm.tokenizer.encode(text) == llama.tokenize(text.encode(), add_bos=True,
                                                             special=True), text[:80]


@pytest.mark.real_model
def test_sentencepiece_loads_without_its_hf_form(llvm):
    """Running Gemma reads sentencepiece.json alone: tokenizer.json (513,000 merges, a second
    to load) stays on disk for web bundles."""
    tokenizer = Tokenizer.load(llvm.artifact / "tokenizer")
    ids = tokenizer.encode(TEXTS[5])
    assert tokenizer.decode(ids[1:]) == TEXTS[5]
    assert not set(tokenizer.encode_ordinary("<end_of_turn>")) & tokenizer.control_ids
    assert len(tokenizer.token_bytes()) == 262144
    assert "_hf" not in vars(tokenizer)


@pytest.mark.real_model
def test_logits_equal_the_numpy_forward_pass_across_position_512(llvm):
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    prompt = llvm.tokenizer.encode(text)[:509]
    logits, tokens = greedy_run(llvm, prompt, 6)  # predicting positions 509..514
    want = reference(llvm, prompt + tokens[:-1])[len(prompt) - 1 :]
    errors = relative_errors(logits, want)
    assert max(errors) < NUMPY_RTOL, errors


@pytest.mark.real_model
@pytest.mark.parametrize("target", ["webgpu", "opencl"])
def test_gpu_logits_equal_llvms(llvm, target):
    prompt = llvm.tokenizer.encode(PROMPTS[0])
    want, tokens = greedy_run(llvm, prompt, 3)
    errors = relative_errors(forced_logits(engine_on(MODEL, target), prompt, tokens), want)
    assert max(errors) < GPU_RTOL, errors


@pytest.mark.real_model
def test_argmax_follows_llama_cpps_greedy_steps(llvm, llama):
    assert_follows_llama_cpp(llvm, llama, PROMPTS, STEPS, LLAMA_CPP_MARGIN)


@pytest.mark.real_model
@pytest.mark.parametrize("target", ["llvm", "webgpu", "opencl", "metal", "cuda"])
def test_no_float16_activation_in_any_kernel(target):
    """The residual stream reaches 1e5, beyond float16: every buffer a kernel computes is
    float32 on every target, metal and cuda included, where float16 is native. (llvm's
    default KV cache is float16: it holds normalized keys and values, far from the limit.)"""
    artifact = reference_build(MODEL, target)
    plan = Plan.load(artifact / "plan.json")
    assert plan.model["dtype"] == "float32"
    computed = {n: b["dtype"] for n, b in plan.buffers.items() if b["kind"] != "param"}
    assert not {n: d for n, d in computed.items() if d not in ("float32", "int32", "int64")}


@pytest.mark.real_model
def test_a_carved_suite_passes_on_webgpu(llvm, tmp_path):
    short = Scenario("short", "a short prompt", PROMPTS[0], chat=False, decode_steps=4)
    assert_carved_suite_passes(llvm, MODEL, short, "webgpu", tmp_path)


@pytest.mark.real_model
@pytest.mark.parametrize("backend", BACKENDS)
def test_structured_output_reads_sentencepiece_pieces(llvm, backend):
    """Grammar engines see each piece as the bytes it stands for ("\u2581" a space, <0x0A> a
    newline): constrained output over Gemma's vocabulary completes and matches."""
    tokenizer = llvm.tokenizer
    pieces = tokenizer.token_bytes()
    assert pieces[tokenizer.encode(" the", add_bos=False)[0]] == b" the"
    assert pieces[tokenizer._spm.ids["<0x0A>"]] == b"\n"
    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"],
              "additionalProperties": False}  # fmt: skip
    cases = [("regex", r" [12][0-9]{3}\.", "Apollo 11 landed on the Moon in the year"),
             ("json_schema", json.dumps(schema), "The year of the Moon landing, as JSON:")]
    for kind, value, prompt in cases:
        constraint = make_constraint(kind, value, tokenizer, backend)
        llvm.reset()
        logits, out = llvm.prefill(tokenizer.encode(prompt)), []
        for _ in range(24):
            token = int(np.argmax(constraint.mask(logits)))
            constraint.accept(token)
            out.append(token)
            if constraint.is_complete():
                break
            logits = llvm.decode(token)
        text = tokenizer.decode(out)
        assert constraint.is_complete(), (kind, text)
        if kind == "regex":
            assert re.fullmatch(value, text), text
        else:
            assert set(json.loads(text)) == {"year"}, text


WINDOW = 8


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A tiny Gemma-3 whose sliding layers see 8 positions, compiled per target."""
    gguf = write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gemma") / "tiny.gguf", WINDOW)

    def get(target: str) -> Engine:
        ok, why = executes_here(TARGETS[target])
        if not ok:
            pytest.skip(f"{target} does not execute here: {why}")
        options = CompileOptions.resolve(target, "gguf", 64, 4, kv_cache="float32")
        out = compile_model(gguf, tmp_path_factory.mktemp(target) / "tiny", options, False)
        return Engine(out)

    return get


@pytest.mark.parametrize("target", ["llvm", "webgpu"])
def test_sliding_window_reaches_exactly_its_positions(tiny_gemma, target):
    """Positions 7..10 straddle the window's edge: the compiled model equals the reference,
    and would not if every layer attended globally, if the sliding layers took the global
    RoPE base, or if the window were one position shorter or longer."""
    engine = tiny_gemma(target)
    prompt = [11, 2000, 305, 47, 9000, 123, 77]  # predicts position 7 next, then decodes
    logits, tokens = greedy_run(engine, prompt, 4)
    ids = prompt + tokens[:-1]
    rows = slice(len(prompt) - 1, None)
    assert max(relative_errors(logits, reference(engine, ids)[rows])) < 1e-4
    config = get_architecture("gemma3").config.from_dict(describe(engine.artifact)["model"])
    wrong = {"every layer global": {"sliding_window": 10**6},
             "the global RoPE base": {"local_rope_theta": config.rope_theta},
             "a window one shorter": {"sliding_window": WINDOW - 1},
             "a window one longer": {"sliding_window": WINDOW + 1}}  # fmt: skip
    for what, changes in wrong.items():
        errors = relative_errors(logits, reference(engine, ids, **changes)[rows])
        assert max(errors) > 1e-2, f"{what} gives the same logits: {errors}"
