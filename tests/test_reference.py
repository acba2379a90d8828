"""The numpy reference forward pass: checked on a tiny random model and against llama.cpp."""

import numpy as np
import pytest

from tapml.compiler import load_model_file
from tapml.errors import ModelNotFound
from tapml.models import DEFAULT_MODEL, MODELS
from tapml.models.llama.config import LlamaConfig
from tapml.models.llama.reference import forward, greedy, rope

TINY = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def tiny_weights(c: LlamaConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    w = {"embed_tokens.weight": rand(c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rand(c.hidden_size)
        w[p + "self_attn.qkv_proj.weight"] = rand(q + 2 * kv, c.hidden_size)
        w[p + "self_attn.o_proj.weight"] = rand(c.hidden_size, q)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(c.hidden_size)
        w[p + "mlp.gate_up_proj.weight"] = rand(2 * c.intermediate_size, c.hidden_size)
        w[p + "mlp.down_proj.weight"] = rand(c.hidden_size, c.intermediate_size)
    w["norm.weight"] = 1 + rand(c.hidden_size)
    return w


def test_causal():
    weights = tiny_weights(TINY)
    tokens = [5, 17, 3, 60, 8, 8, 41]
    full = forward(weights, TINY, tokens)
    assert full.shape == (len(tokens), TINY.vocab_size) and full.dtype == np.float64
    for n in (1, 4, len(tokens) - 1):
        np.testing.assert_allclose(forward(weights, TINY, tokens[:n])[-1], full[n - 1], atol=1e-12)


def test_tied_equals_explicit_lm_head():
    weights = tiny_weights(TINY)
    tokens = [1, 2, 3, 4]
    explicit = dict(weights, **{"lm_head.weight": weights["embed_tokens.weight"].copy()})
    np.testing.assert_array_equal(forward(weights, TINY, tokens), forward(explicit, TINY, tokens))
    other = dict(weights, **{"lm_head.weight": weights["embed_tokens.weight"][::-1].copy()})
    assert not np.allclose(forward(weights, TINY, tokens), forward(other, TINY, tokens))


def test_rope_rotates_adjacent_pairs():
    x = np.zeros((3, 1, 4))
    x[:, 0, 0] = 1.0  # the first pair, angle pos * theta^0 = pos radians
    out = rope(x, theta=100.0)
    pos = np.arange(3)
    np.testing.assert_allclose(out[:, 0, 0], np.cos(pos))
    np.testing.assert_allclose(out[:, 0, 1], np.sin(pos))
    np.testing.assert_array_equal(out[:, 0, 2:], 0.0)


def test_greedy_tiny():
    ids = greedy(tiny_weights(TINY), TINY, [1, 2, 3], 4)
    assert len(ids) == 4 and all(0 <= i < TINY.vocab_size for i in ids)


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = MODELS[DEFAULT_MODEL].gguf_path()
    except ModelNotFound as e:
        pytest.skip(str(e))
    model = load_model_file(path)
    return model.float_weights(), model.config


@pytest.mark.real_model
def test_greedy_matches_llama_cpp(smollm2):
    weights, config = smollm2
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    assert greedy(weights, config, prompt, 5) == [7042, 30, 198, 198, 504]
