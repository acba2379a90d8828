"""The shared layers the architectures compose (tapml.nn), each against numpy at odd shapes, on
llvm and on webgpu (where it executes): a linear layer with a bias, RMSNorm on Q and K, a
norm after a sublayer, GELU (tanh and erf) and GeGLU, LayerNorm, and attention with a sliding
window."""

from __future__ import annotations

import math

import numpy as np
import pytest
from plan_module import executor_for, runs_here
from tvm.relax.frontend import nn

from tapml import nn as tnn
from tapml.formats import FLOAT32
from tapml.models.llama.reference import rms_norm

TARGETS = ["llvm", "webgpu"]
RTOL = 2e-5  # float32 kernels against float64 numpy, over the output's largest value
rng = np.random.default_rng(0)


def run(module: nn.Module, inputs: dict[str, np.ndarray], params: dict[str, np.ndarray],
        target: str, tmp_path, scalars: dict[str, int] | None = None) -> np.ndarray:  # fmt: skip
    """The module's `decode` (its only entry point that matters) on `target`."""
    ok, why = runs_here(target)
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")
    specs = {name: (nn.spec.Tensor(list(a.shape), str(a.dtype)) if isinstance(a, np.ndarray)
                    else int) for name, a in inputs.items()}  # fmt: skip
    executor = executor_for(module, {"decode": specs, "prefill": specs}, target, tmp_path)
    executor.load_params(params)
    arrays = {f"decode.{n}": a for n, a in inputs.items() if isinstance(a, np.ndarray)}
    return executor.run("decode", scalars or {}, arrays)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert error < RTOL, f"relative error {error:.2e}"


@pytest.mark.parametrize("target", TARGETS)
def test_linear_with_a_bias_over_stacked_parts(target, tmp_path):
    class Biased(nn.Module):
        def __init__(self):
            self.proj = tnn.Linear(40, [24, 13], FLOAT32, bias="float32")

        def decode(self, x):
            return self.proj(x)

        prefill = decode

    w = rng.standard_normal((37, 40)).astype(np.float32)
    b = rng.standard_normal(37).astype(np.float32)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    got = run(Biased(), {"x": x}, {"proj.weight": w, "proj.bias": b}, target, tmp_path)
    assert_close(got, x.astype(np.float64) @ w.T + b)


@pytest.mark.parametrize("target", TARGETS)
def test_rms_norm_on_query_and_key_heads(target, tmp_path):
    heads, kv_heads, dim = 5, 3, 24  # V heads pass through

    class QK(nn.Module):
        def __init__(self):
            self.q_norm = tnn.RMSNorm(dim, 1e-6, "float32")
            self.k_norm = tnn.RMSNorm(dim, 1e-6, "float32")

        def decode(self, qkv):
            return tnn.qk_norm(qkv, self.q_norm, self.k_norm, heads, kv_heads)

        prefill = decode

    qkv = rng.standard_normal((3, heads + 2 * kv_heads, dim)).astype(np.float32)
    wq, wk = (1 + 0.1 * rng.standard_normal((2, dim))).astype(np.float32)
    got = run(QK(), {"qkv": qkv}, {"q_norm.weight": wq, "k_norm.weight": wk}, target, tmp_path)
    x = qkv.astype(np.float64)
    want = x.copy()
    want[:, :heads] = rms_norm(x[:, :heads], wq, 1e-6)
    want[:, heads : heads + kv_heads] = rms_norm(x[:, heads : heads + kv_heads], wk, 1e-6)
    assert_close(got, want)


@pytest.mark.parametrize("target", TARGETS)
def test_norm_after_a_sublayer_then_the_residual(target, tmp_path):
    class PostNorm(nn.Module):
        def __init__(self):
            self.norm = tnn.RMSNorm(70, 1e-6, "float32")

        def decode(self, residual, x):
            return self.norm.add_to(residual, x)

        prefill = decode

    residual, x = rng.standard_normal((2, 3, 70)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(70)).astype(np.float32)
    got = run(PostNorm(), {"residual": residual, "x": x}, {"norm.weight": w}, target, tmp_path)
    assert_close(got, residual + rms_norm(x.astype(np.float64), w, 1e-6))


def gelu_numpy(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("approximate", ["tanh", "erf"])
def test_gelu_and_geglu(target, approximate, tmp_path):
    class Gelus(nn.Module):
        def decode(self, x):
            return tnn.gelu(x, approximate), tnn.gelu_multiply(x, approximate)

        prefill = decode

    x = (3 * rng.standard_normal((3, 46))).astype(np.float32)
    x[0, :4] = [0.0, -9.0, 9.0, -0.5]
    ok, why = runs_here(target)
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")
    specs = {"x": nn.spec.Tensor([3, 46], "float32")}
    executor = executor_for(Gelus(), {"decode": specs, "prefill": specs}, target, tmp_path)
    plain = executor.run("decode", {}, {"decode.x": x})
    gated = executor.download(executor.plan.functions["decode"]["outputs"][1])
    x64 = x.astype(np.float64)
    assert_close(plain, gelu_numpy(x64, approximate))
    assert_close(gated, gelu_numpy(x64[:, :23], approximate) * x64[:, 23:])


@pytest.mark.parametrize("target", TARGETS)
def test_layer_norm(target, tmp_path):
    class Norm(nn.Module):
        def __init__(self):
            self.norm = tnn.LayerNorm(70, 1e-12, "float32")

        def decode(self, x):
            return self.norm(x)

        prefill = decode

    x = (5 + rng.standard_normal((3, 70))).astype(np.float32)  # a mean far from 0
    w, b = rng.standard_normal((2, 70)).astype(np.float32)
    got = run(Norm(), {"x": x}, {"norm.weight": w, "norm.bias": b}, target, tmp_path)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    assert_close(got, (x64 - mean) / np.sqrt(var + 1e-12) * w + b)


def attention_numpy(q, keys, values, pos, window, scale):
    """q [s, H, D] at positions pos.., caches [KV, ctx, D]: each row sees its last `window`."""
    rows, heads, _ = q.shape
    group = heads // keys.shape[0]
    out = np.zeros(q.shape)
    for i in range(rows):
        last = pos + i
        first = 0 if window is None else max(0, last - window + 1)
        for h in range(heads):
            k, v = keys[h // group, first : last + 1], values[h // group, first : last + 1]
            s = k @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = p @ v / p.sum()
    return out.reshape(rows, -1)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("rows", "pos", "window"), [(1, 40, 7), (1, 40, 33), (5, 20, 16),
                                                     (3, 2, 7), (1, 40, None)])  # fmt: skip
def test_attention_within_a_sliding_window(target, rows, pos, window, tmp_path):
    heads, kv_heads, dim, ctx = 6, 2, 20, 64
    scale = 0.3  # not 1/sqrt(D): Gemma scales by its own query_pre_attn_scalar

    class Attend(nn.Module):
        def decode(self, q, k_cache, v_cache, pos):
            return tnn.attention(q, k_cache, v_cache, pos, window=window, scale=scale)

        prefill = decode

    q = rng.standard_normal((rows, heads, dim)).astype(np.float32)
    keys = rng.standard_normal((kv_heads, ctx, dim)).astype(np.float32)
    values = rng.standard_normal((kv_heads, ctx, dim)).astype(np.float32)
    tiled = np.zeros(tnn.key_cache_shape(kv_heads, ctx, dim), np.float32)
    tile = tiled.shape[3]
    tiled[...] = keys.reshape(kv_heads, -1, tile, dim).transpose(0, 1, 3, 2)
    got = run(Attend(), {"q": q, "k_cache": tiled, "v_cache": values, "pos": pos}, {}, target,
              tmp_path, {"pos": pos})  # fmt: skip
    want = attention_numpy(q.astype(np.float64), keys.astype(np.float64),
                           values.astype(np.float64), pos, window, scale)  # fmt: skip
    assert_close(got, want)


def test_rotary_tables_take_each_layers_base():
    cos, sin = tnn.rotary_tables(5, 8, 1e6)
    angles = np.arange(5)[:, None] * 1e6 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(cos, np.cos(angles), rtol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-7)
