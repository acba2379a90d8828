"""SmolLM2 with its GGUF's own blocks (the default `gguf` scheme) against the same weights
dequantized exactly (q0f32), and against llama.cpp on the same GGUF, live."""

import pytest
from conftest import PROMPT_IDS, assert_close, greedy_trace
from real_models import engine_on

from tapml.api import ensure_compiled
from tapml.artifact import describe
from tapml.bench import AGREEMENT_PROMPTS, forced_logits, llama_cpp_logits, top2_margin
from tapml.models import MODELS
from tapml.runtime.engine import Engine

pytestmark = pytest.mark.real_model

# max |stored - q0f32| / max |q0f32| per logits vector, float32 activations and KV cache both:
# the same weights, summed in another order (llvm), or on another device (float32 GPUs)
RTOL = {"llvm": 1e-5, "webgpu": 1e-3, "opencl": 1e-3}
DECODE_STEPS = 8
GREEDY_TOKENS = 32
Q0F32_MARGIN = 0.01  # steps where q0f32's top two logits are closer are a coin toss
LLAMA_CPP_MARGIN = 0.5  # llama.cpp computes in its own order and precision (Q8 activations)


def stored(target: str = "llvm") -> Engine:
    return engine_on("smollm2-135m", target)


@pytest.fixture(scope="module")
def q0f32():
    return Engine(ensure_compiled("smollm2-135m", "llvm", "q0f32", kv_cache="float32",
                                  progress=False))  # fmt: skip


def test_the_default_keeps_the_ggufs_blocks():
    engine = stored()
    config = describe(engine.artifact)
    assert config["options"]["quantization"] == "gguf"
    assert set(config["weights"]["formats"]) == {"Q4_1", "Q8_0"}  # as llama.cpp reads them
    assert config["weights"]["matrices"]["embed_tokens"] == ["Q8_0"]
    assert config["weights"]["matrices"]["layers.0.self_attn.qkv_proj"] == ["Q4_1"] * 3


@pytest.mark.parametrize("target", list(RTOL))
def test_logits_equal_the_exactly_dequantized_weights(q0f32, target):
    got, got_ids = greedy_trace(stored(target), PROMPT_IDS, DECODE_STEPS)
    want, want_ids = greedy_trace(q0f32, PROMPT_IDS, DECODE_STEPS)
    assert got_ids == want_ids
    assert_close(got, want, RTOL[target])


@pytest.mark.parametrize("prompt", AGREEMENT_PROMPTS)
def test_greedy_steps_follow_q0f32_and_llama_cpp(q0f32, prompt):
    """Fed q0f32's greedy continuation, the stored model picks q0f32's token wherever q0f32's
    margin is over 0.01 logits, and llama.cpp's wherever llama.cpp's is over 0.5."""
    engine = stored()
    ids = engine.tokenizer.encode(prompt)
    theirs, tokens = greedy_trace(q0f32, ids, GREEDY_TOKENS)
    ours = forced_logits(engine, ids, tokens)
    gguf = MODELS["smollm2-135m"].gguf_path()
    llama = llama_cpp_logits(gguf, ids + tokens)[len(ids) - 1 : len(ids) - 1 + len(tokens)]
    for step, (a, b, c) in enumerate(zip(ours, theirs[:-1], llama, strict=True)):
        if top2_margin(b) > Q0F32_MARGIN:
            assert a.argmax() == b.argmax(), f"step {step}: q0f32 picks {b.argmax()}"
        if top2_margin(c) > LLAMA_CPP_MARGIN:
            assert a.argmax() == c.argmax(), f"step {step}: llama.cpp picks {c.argmax()}"
