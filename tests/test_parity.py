"""SmolLM2 on webgpu, vulkan and opencl gives llvm's tokens and logits (the GGUF's own blocks).

The kernels and weights are the same; only float rounding differs (GPU-style reductions
sum in another order). Each target is fed llvm's greedy tokens (teacher forcing), so one
near-tie cannot derail the rest: at every step the logits must agree within TOLERANCE, and
the argmax must agree unless llvm's top two are closer than that tolerance (a near-tie,
reported in the failure message if it ever decides a token).
"""

import numpy as np
import pytest
from conftest import PROMPT_IDS
from real_models import engine_on

pytestmark = pytest.mark.real_model

STEPS = 16
TOLERANCE = 2e-3  # max |difference| / max |llvm logit|, float32 activations


@pytest.fixture(scope="module")
def llvm_run():
    engine = engine_on("smollm2-135m", "llvm")
    logits = [engine.prefill(PROMPT_IDS)]
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(engine.decode(tokens[-1]))
    return tokens, logits


@pytest.mark.parametrize("target", ["webgpu", "vulkan", "opencl"])
def test_first_16_greedy_tokens_and_logits_match_llvm(llvm_run, target):
    tokens, expected = llvm_run
    engine = engine_on("smollm2-135m", target)
    got = [engine.prefill(PROMPT_IDS)] + [engine.decode(t) for t in tokens]
    for step, (g, e) in enumerate(zip(got[:STEPS], expected[:STEPS], strict=True)):
        scale = np.abs(e).max()
        error = np.abs(g - e).max() / scale
        assert error < TOLERANCE, f"step {step}: relative logit error {error:.2e}"
        top2 = np.sort(e)[-2:]
        near_tie = (top2[1] - top2[0]) / scale < TOLERANCE
        assert near_tie or int(np.argmax(g)) == tokens[step], f"step {step}: token differs"
