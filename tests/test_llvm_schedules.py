"""The llvm schedule rules: which rule each kernel pattern gets, and its numerics vs numpy.

Kernels come from tapml.nn's layers through the same lowering as the compiler (a tiny
module with `decode` (one row) and `prefill` (a chunk) entry points), at the real model's
shapes and at odd ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tapml import lower
from tapml import nn as tnn
from tapml.quantization import QUANTIZATION
from tapml.targets.llvm_schedules import ATTR, PREFETCH_BYTES, schedule_func
from tapml.targets.llvm_schedules.int8 import has_vnni

CHUNK = 32
MODE = {"param_mode": "plain", "effect_mode": "none"}
TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
rng = np.random.default_rng(0)


def entry_calls(
    module: nn.Module, inputs: Callable[[int], dict], chunk: int = CHUNK
) -> dict[str, list[tvm.tirx.PrimFunc]]:
    """{entry point: the kernels it calls, in order}, lowered as the compiler lowers a model;
    `inputs(rows)` gives the entry points' input specs for one row (decode) and a chunk."""
    specs = {"decode": inputs(1), "prefill": inputs(chunk)}
    mod, _ = module.export_tvm(spec={e: {**s, "$": MODE} for e, s in specs.items()})
    fused = lower.fuse(mod, list(specs))
    funcs = lower.kernel_functions(fused)
    return {
        entry: [
            funcs[b.value.args[0].name_hint]
            for block in fused[entry].body.blocks
            for b in block.bindings
            if isinstance(b.value, tvm.relax.Call)
            and isinstance(b.value.op, tvm.ir.Op)
            and b.value.op.name.startswith("relax.call_tir")
        ]
        for entry in specs
    }


def entry_kernels(
    module: nn.Module, inputs: Callable[[int], dict], chunk: int = CHUNK
) -> dict[str, tvm.tirx.PrimFunc]:
    """{entry point: the one kernel it calls} (see `entry_calls`)."""
    calls = entry_calls(module, inputs, chunk)
    assert all(len(funcs) == 1 for funcs in calls.values()), calls
    return {entry: funcs[0] for entry, funcs in calls.items()}


def run(func: tvm.tirx.PrimFunc, args: list, target=TARGET, int8: frozenset[str] = frozenset()
        ) -> tuple[list[np.ndarray], str | None]:  # fmt: skip
    """Schedule, compile and run a kernel (`int8`: the stages whose matmuls may quantize
    their activations); returns its array arguments after the call and the rule that
    scheduled it."""
    scheduled = schedule_func(func, target, int8)
    name = str(func.attrs["global_symbol"])
    lib = tvm.compile(tvm.IRModule({name: scheduled}), target=target)
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) if isinstance(a, np.ndarray) else a for a in args]
    lib[name](*tensors)
    arrays = [t.numpy() for t in tensors if not isinstance(t, int)]
    rule = scheduled.attrs[ATTR] if ATTR in scheduled.attrs else None
    return arrays, rule


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    rel = 2e-3 if dtype == "float16" else 2e-5
    scale = float(np.abs(ref).max()) or 1.0
    np.testing.assert_allclose(out.astype("float32"), ref, rtol=0, atol=rel * scale)


# -- matmuls (Linear), with the epilogues the model fuses into them ----------------------
class Linear(nn.Module):
    def __init__(self, k: int, n: int, fmt, epilogue: str | None):
        self.lin = tnn.Linear(k, n, fmt)
        self.epilogue = epilogue

    def decode(self, x, r):
        y = self.lin(x)
        if self.epilogue == "add":
            return y + r
        if self.epilogue == "silu_mul":
            return op.silu(y) * r
        return y

    prefill = decode


def weights(quant, n: int, k: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(the kernel's weight arguments, the float32 weight they stand for)."""
    w = (0.1 * rng.standard_normal((n, k))).astype("float32")
    if quant.matrix.quantized:
        words, scale = quant.matrix.quantize(w)
        return [words, scale], quant.matrix.dequantize({"q_weight": words, "q_scale": scale})
    w = w.astype(quant.dtype)
    return [w], w.astype("float32")


MATMULS = [
    # quantization, N, K, epilogue: the real shapes, then odd ones (K % 128 != 0, N not a
    # multiple of the vector width)
    ("q4f32_1", 3072, 576, None),  # gate and up
    ("q4f32_1", 576, 1536, "add"),  # down
    ("q4f32_1", 960, 576, None),  # Q, K and V
    ("q0f32", 576, 576, "add"),  # output projection
    ("q0f32", 3072, 576, None),
    ("q4f32_1", 1536, 576, "silu_mul"),
    ("q4f32_1", 200, 96, "add"),
    ("q4f32_1", 37, 160, None),
    ("q4f32_1", 33, 1120, "add"),  # 8 vectors of 16 words and a tail of 12: pieces of 8 and 4
    ("q0f32", 100, 160, "add"),
    ("q0f32", 37, 100, None),
    ("q4f16_1", 200, 96, "silu_mul"),
]


@pytest.mark.parametrize("quantization,n,k,epilogue", MATMULS)
def test_matmul(quantization, n, k, epilogue):
    quant = QUANTIZATION[quantization]
    dt = quant.dtype
    kernels = entry_kernels(
        Linear(k, n, quant.matrix, epilogue),
        lambda rows: {"x": nn.spec.Tensor([rows, k], dt), "r": nn.spec.Tensor([rows, n], dt)},
    )
    params, w = weights(quant, n, k)
    decode_rule = "packed_gemv" if quant.matrix.quantized else "gemv"
    for entry, rows, rule in (("decode", 1, decode_rule), ("prefill", CHUNK, "gemm")):
        x = rng.standard_normal((rows, k)).astype(dt)
        r = rng.standard_normal((rows, n)).astype(dt)
        ref = x.astype("float32") @ w.T
        if epilogue == "add":
            ref = ref + r.astype("float32")
        elif epilogue == "silu_mul":
            ref = ref / (1 + np.exp(-ref)) * r.astype("float32")
        args = [x, *params, *([r] if epilogue else []), np.zeros((rows, n), dt)]
        arrays, used = run(kernels[entry], args)
        assert used == rule
        assert_close(arrays[-1], ref, dt)


def test_matmul_on_a_cpu_with_narrow_vectors():
    """A generic x86-64 target has 128-bit vectors: the rules must not assume AVX-512."""
    quant = QUANTIZATION["q4f32_1"]
    kernels = entry_kernels(
        Linear(96, 40, quant.matrix, None),
        lambda rows: {
            "x": nn.spec.Tensor([rows, 96], "float32"),
            "r": nn.spec.Tensor([rows, 40], "float32"),
        },
        chunk=8,
    )
    params, w = weights(quant, 40, 96)
    generic = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    for entry, rows in (("decode", 1), ("prefill", 8)):
        x = rng.standard_normal((rows, 96)).astype("float32")
        arrays, _ = run(kernels[entry], [x, *params, np.zeros((rows, 40), "float32")], generic)
        assert_close(arrays[-1], x @ w.T, "float32")


def qkv_gemv() -> tvm.tirx.PrimFunc:
    """The real model's decode GEMV of Q, K and V, scheduled."""
    kernels = entry_kernels(
        Linear(576, 960, QUANTIZATION["q4f32_1"].matrix, None),
        lambda rows: {"x": nn.spec.Tensor([rows, 576], "float32"),
                      "r": nn.spec.Tensor([rows, 960], "float32")},  # fmt: skip
    )
    return schedule_func(kernels["decode"], TARGET)


def test_packed_gemv_prefetches_the_weight_rows_ahead():
    calls = []
    tvm_ffi.structural_walk(qkv_gemv().body, (tvm.ir.expr.Call, calls.append))
    prefetched = [c.args[1].args[0] for c in calls if "llvm.prefetch" in str(c)]
    # a 288-byte row of words takes 5 cache lines, its 18 scales one or two
    assert {str(load.source) for load in prefetched} == {"lin_q_weight", "lin_q_scale"}
    assert len(prefetched) == 5 + 2
    ahead = PREFETCH_BYTES // 288
    assert all(str(load.indices[0]).endswith(f"+ {ahead}") for load in prefetched)


def test_packed_gemv_unpacks_fields_without_int_to_float_conversions():
    casts = []

    def visit(e):
        if str(e.ty) == "float32" and str(e.value.ty) in ("uint32", "int32"):
            casts.append(e)

    tvm_ffi.structural_walk(qkv_gemv().body, (tvm.tirx.Cast, visit))
    assert casts == []


# GGUF blocks kept as stored, at the shapes of SmolLM2 (Q4_1 gate and up; its Q8_0 embedding
# as the output layer, fewer rows) and of Qwen2.5's and Gemma-3's K-quants; Q5_0 at 864 ends
# in pieces of 8 and 4 words, whose high bits lie inside their word
GGUF_MATMULS = [("Q4_1", 3072, 576), ("Q8_0", 4096, 576), ("Q4_0", 37, 800), ("Q5_0", 96, 896),
                ("Q5_0", 37, 864), ("Q4_K", 64, 768), ("Q5_K", 37, 512),
                ("Q6_K", 896, 1024)]  # fmt: skip


@pytest.mark.parametrize("kind,n,k", GGUF_MATMULS)
def test_gguf_blocks_get_the_packed_gemv_and_the_cpus_half_conversions(kind, n, k):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from gguf_blocks import random_blocks

    from tapml.gguf_formats import BLOCK_FORMATS
    from tapml.source import SourceTensor

    fmt = BLOCK_FORMATS[kind]

    class Lin(nn.Module):
        def __init__(self):
            self.lin = tnn.Linear(k, n, fmt)

        def decode(self, x):
            return self.lin(x)

        prefill = decode

    kernels = entry_kernels(Lin(), lambda rows: {"x": nn.spec.Tensor([rows, k], "float32")})
    raw = random_blocks(kind, n, k, 1 / np.sqrt(k))
    planes = fmt.encode(SourceTensor("w", kind, (n, k), lambda: raw, None))
    w = dequantize(raw, GGMLQuantizationType[kind]).astype(np.float64)
    for entry, rows, rule in (("decode", 1, "packed_gemv"), ("prefill", CHUNK, "gemm")):
        x = rng.standard_normal((rows, k)).astype("float32")
        arrays, used = run(kernels[entry], [x, *planes.values(), np.zeros((rows, n), "float32")])
        assert used == rule
        assert_close(arrays[-1], x @ w.T, "float32")
        assert "float16" in cast_sources(schedule_func(kernels[entry], TARGET))  # F16C's


INT8_RTOL = 1e-2  # int8 activations against float32 ones: 8 bits per value, one scale a span


def int8_activations(x: np.ndarray, span: int) -> np.ndarray:
    """x as the int8 kernels see it: per row and span of k, round(x * (127 / top)) * d, with
    top = max |x| and d = top / 127, in float32 as the kernels compute them (a value on a
    rounding tie would round otherwise in float64)."""
    spans = x.reshape(x.shape[0], -1, span).astype(np.float32)
    top = np.abs(spans).max(axis=-1, keepdims=True)
    inverse = np.divide(np.float32(127), top, out=np.zeros_like(top), where=top > 0)
    q = np.round(spans * inverse)
    return (q.astype(np.float64) * (top / np.float32(127))).reshape(x.shape)


INT8_MATMULS = [("Q5_0", 96, 896), ("Q8_0", 64, 576), ("Q4_K", 37, 512), ("Q6_K", 48, 1024),
                ("Q4_1", 40, 96), ("Q5_K", 16, 256), ("Q4_0", 33, 800)]  # fmt: skip
# decode: K of whole vectors of 16 low words (Q4_1 and Q4_0 at 128 and 768)
INT8_GEMVS = [(kind, n, {96: 128, 800: 768}.get(k, k)) for kind, n, k in INT8_MATMULS]
INT8 = frozenset({"prefill", "decode"})


def assert_int8_matmul(kind: str, n: int, k: int, rows: int) -> None:
    """int8 activations: x is quantized per span of the weight's groups (at most 32 values);
    the int32 dot products then make the result exact but for float32 rounding, and within
    INT8_RTOL of the float32 product. Without int8, the float32 rule schedules it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from gguf_blocks import random_blocks

    from tapml.gguf_formats import BLOCK_FORMATS
    from tapml.source import SourceTensor

    fmt = BLOCK_FORMATS[kind]
    kernels = entry_kernels(Linear(k, n, fmt, "add"),
                            lambda r: {"x": nn.spec.Tensor([r, k], "float32"),
                                       "r": nn.spec.Tensor([r, n], "float32")},
                            chunk=max(rows, 2))  # fmt: skip
    raw = random_blocks(kind, n, k, 1 / np.sqrt(k))
    planes = fmt.encode(SourceTensor("w", kind, (n, k), lambda: raw, None))
    w = dequantize(raw, GGMLQuantizationType[kind]).astype(np.float64)
    x = rng.standard_normal((rows, k)).astype("float32")
    r = rng.standard_normal((rows, n)).astype("float32")
    args = [x, *planes.values(), r, np.zeros((rows, n), "float32")]
    entry, int8_rule = ("decode", "int8_gemv") if rows == 1 else ("prefill", "int8_gemm")
    arrays, rule = run(kernels[entry], args, int8=INT8)
    assert rule == int8_rule
    assert_close(arrays[-1], int8_activations(x, min(fmt.group, 32)) @ w.T + r, "float32")
    float_product = x @ w.T
    error = np.abs(arrays[-1] - r - float_product).max() / np.abs(float_product).max()
    assert 1e-4 < error < INT8_RTOL  # quantized, and only so much
    arrays, rule = run(kernels[entry], args)
    assert rule != int8_rule  # float32 unless the compile asks for int8


@pytest.mark.skipif(not has_vnni(TARGET), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("kind,n,k", INT8_MATMULS)
@pytest.mark.parametrize("rows", [16, 32, 96])
def test_int8_prefill_matmul_equals_its_quantized_activations_product(kind, n, k, rows):
    assert_int8_matmul(kind, n, k, rows)


@pytest.mark.skipif(not has_vnni(TARGET), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("kind,n,k", INT8_GEMVS)
def test_int8_decode_matmul_equals_its_quantized_activations_product(kind, n, k):
    assert_int8_matmul(kind, n, k, 1)


@pytest.mark.skipif(not has_vnni(TARGET), reason="this CPU has no AVX-512 VNNI")
def test_int8_decode_matmul_of_k_in_part_vectors_is_float32():
    """K of 72 low words (SmolLM2's 576 in 4-bit words) is no whole number of 16-word
    vectors: the float32 GEMV computes it."""
    quant = QUANTIZATION["q4f32_1"]
    kernels = entry_kernels(Linear(576, 64, quant.matrix, None),
                            lambda r: {"x": nn.spec.Tensor([r, 576], "float32"),
                                       "r": nn.spec.Tensor([r, 64], "float32")})  # fmt: skip
    params, w = weights(quant, 64, 576)
    x = rng.standard_normal((1, 576)).astype("float32")
    arrays, rule = run(kernels["decode"], [x, *params, np.zeros((1, 64), "float32")], int8=INT8)
    assert rule == "packed_gemv"
    assert_close(arrays[-1], x @ w.T, "float32")


@pytest.mark.skipif(not has_vnni(TARGET), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("quantization", ["q4f32_1", "q4f16_1"])
@pytest.mark.parametrize("rows,k,rule", [(CHUNK, 96, "int8_gemm"), (1, 128, "int8_gemv")])
def test_int8_matmul_of_tapmls_own_groups_and_float16_activations(quantization, rows, k, rule):
    quant = QUANTIZATION[quantization]
    dt, n = quant.dtype, 200
    kernels = entry_kernels(Linear(k, n, quant.matrix, "add"),
                            lambda r: {"x": nn.spec.Tensor([r, k], dt),
                                       "r": nn.spec.Tensor([r, n], dt)})  # fmt: skip
    params, w = weights(quant, n, k)
    x = rng.standard_normal((rows, k)).astype(dt)
    r = rng.standard_normal((rows, n)).astype(dt)
    entry = "decode" if rows == 1 else "prefill"
    arrays, used = run(kernels[entry], [x, *params, r, np.zeros((rows, n), dt)], int8=INT8)
    assert used == rule
    want = int8_activations(x.astype("float32"), 32) @ w.T + r.astype("float32")
    assert_close(arrays[-1], want, dt)


def cast_sources(func: tvm.tirx.PrimFunc) -> set[str]:
    """The types a function's casts convert from."""
    found = set()
    tvm_ffi.structural_walk(func.body, (tvm.tirx.Cast, lambda c: found.add(str(c.value.ty))))
    return found


@pytest.mark.parametrize("lanes", [4, 8])
def test_packed_gemv_with_narrow_registers(lanes, monkeypatch):
    """SSE and AVX2 registers: 4 or 8 words a vector (one or two scales), other tail pieces."""
    from tapml.targets import llvm_schedules

    monkeypatch.setattr(llvm_schedules.Kernel, "lanes", lambda self: lanes)
    quant = QUANTIZATION["q4f32_1"]
    for n, k in ((40, 96), (24, 352)):
        kernels = entry_kernels(
            Linear(k, n, quant.matrix, None),
            lambda rows, n=n, k=k: {"x": nn.spec.Tensor([rows, k], "float32"),
                                    "r": nn.spec.Tensor([rows, n], "float32")},  # fmt: skip
        )
        params, w = weights(quant, n, k)
        x = rng.standard_normal((1, k)).astype("float32")
        arrays, rule = run(kernels["decode"], [x, *params, np.zeros((1, n), "float32")])
        assert rule == "packed_gemv"
        assert_close(arrays[-1], x @ w.T, "float32")


@pytest.mark.parametrize("chunk", [7, 40, 100])  # 40: rows of five 8-lane vectors
def test_gemm_with_other_chunk_sizes(chunk):
    """Rows are vectorized: a chunk that is not a multiple of the vector width still works."""
    quant = QUANTIZATION["q4f32_1"]
    kernels = entry_kernels(
        Linear(64, 48, quant.matrix, "add"),
        lambda rows: {
            "x": nn.spec.Tensor([rows, 64], "float32"),
            "r": nn.spec.Tensor([rows, 48], "float32"),
        },
        chunk=chunk,
    )
    params, w = weights(quant, 48, 64)
    x = rng.standard_normal((chunk, 64)).astype("float32")
    r = rng.standard_normal((chunk, 48)).astype("float32")
    arrays, rule = run(kernels["prefill"], [x, *params, r, np.zeros((chunk, 48), "float32")])
    assert rule == "gemm"
    assert_close(arrays[-1], x @ w.T + r, "float32")


# -- RMSNorm --------------------------------------------------------------------------------
class Norm(nn.Module):
    def __init__(self, dim: int, dtype: str):
        self.norm = tnn.RMSNorm(dim, 1e-5, dtype)

    def decode(self, x):
        return self.norm(x)

    prefill = decode


@pytest.mark.parametrize("dtype,dim", [("float32", 576), ("float32", 100), ("float16", 576)])
def test_rms_norm(dtype, dim):
    kernels = entry_kernels(
        Norm(dim, dtype), lambda rows: {"x": nn.spec.Tensor([rows, dim], dtype)}
    )
    w = (1 + 0.1 * rng.standard_normal(dim)).astype(dtype)
    for entry, rows in (("decode", 1), ("prefill", CHUNK)):
        x = rng.standard_normal((rows, dim)).astype(dtype)
        xf = x.astype("float32")
        ref = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + 1e-5) * w.astype("float32")
        arrays, rule = run(kernels[entry], [x, w, np.zeros_like(x)])
        assert rule == "row_reduction"
        assert_close(arrays[-1], ref, dtype)


class EncoderParts(nn.Module):
    """BERT's row reductions (LayerNorm: two sums a row; softmax: a max and a sum) and its
    attention scores (a batched matmul over [batch, heads])."""

    def __init__(self, dim: int):
        self.norm = tnn.LayerNorm(dim, 1e-12, "float32")

    def decode(self, x, scores, q, k):
        return self.norm(x), op.softmax(scores, axis=-1), op.matmul(q, k)

    prefill = decode


@pytest.mark.parametrize("rows", [3, 256])  # 256: two blocks of GEMM_ROWS
def test_layer_norm_softmax_and_batched_matmuls_are_scheduled_by_rows(rows):
    specs = lambda _: {"x": nn.spec.Tensor([rows, 96], "float32"),  # noqa: E731
                       "scores": nn.spec.Tensor([2, 3, rows, 40], "float32"),
                       "q": nn.spec.Tensor([2, 3, rows, 32], "float32"),
                       "k": nn.spec.Tensor([2, 3, 32, 24], "float32")}  # fmt: skip
    norm, softmax, matmul = entry_calls(EncoderParts(96), specs)["decode"]
    x = rng.standard_normal((rows, 96)).astype("float32")
    w, b = rng.standard_normal(96).astype("float32"), rng.standard_normal(96).astype("float32")
    arrays, rule = run(norm, [x, w, b, np.zeros_like(x)])
    centered = x - x.mean(-1, keepdims=True)
    want = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-12) * w + b
    assert rule == "row_reduction"
    assert_close(arrays[-1], want, "float32")
    scores = rng.standard_normal((2, 3, rows, 40)).astype("float32")
    arrays, rule = run(softmax, [scores, np.zeros_like(scores)])
    e = np.exp(scores - scores.max(-1, keepdims=True))
    assert rule == "row_reduction"
    assert_close(arrays[-1], e / e.sum(-1, keepdims=True), "float32")
    q = rng.standard_normal((2, 3, rows, 32)).astype("float32")
    k = rng.standard_normal((2, 3, 32, 24)).astype("float32")
    arrays, rule = run(matmul, [q, k, np.zeros((2, 3, rows, 24), "float32")])
    assert rule == "gemm"
    assert_close(arrays[-1], q @ k, "float32")


# -- elementwise: embedding lookups, RoPE, KV writes, the last valid row -------------------
class Embed(nn.Module):
    def __init__(self, vocab: int, dim: int, quant):
        self.embed = tnn.Embedding(vocab, dim, quant.matrix, quant.dtype)

    def decode(self, ids):
        return self.embed(ids)

    prefill = decode


@pytest.mark.parametrize("quantization,dim", [("q4f32_1", 576), ("q0f32", 576), ("q4f32_1", 96)])
def test_embedding(quantization, dim):
    quant, vocab = QUANTIZATION[quantization], 300
    kernels = entry_kernels(
        Embed(vocab, dim, quant), lambda rows: {"ids": nn.spec.Tensor([rows], "int32")}
    )
    params, w = weights(quant, vocab, dim)
    for entry, rows in (("decode", 1), ("prefill", CHUNK)):
        ids = rng.integers(0, vocab, rows).astype("int32")
        out = np.zeros((rows, dim), quant.dtype)
        arrays, rule = run(kernels[entry], [ids, *params, out])  # the lookup's (ids, planes)
        assert rule == "elementwise"
        assert_close(arrays[-1], w[ids], quant.dtype)


class RopeKVWrite(nn.Module):
    def __init__(self, max_context: int, head_dim: int):
        self.rope = tnn.RotaryTables(max_context, head_dim)

    def decode(self, qkv, k_cache, v_cache, pos):
        return self.rope(qkv, 9, k_cache, v_cache, pos, 1)

    def prefill(self, qkv, k_cache, v_cache, pos, n_valid):
        return self.rope(qkv, 9, k_cache, v_cache, pos, n_valid)


def key_tiles(keys: np.ndarray) -> np.ndarray:
    """Keys [kv_heads, ctx, dim] in the key cache's layout (`tnn.key_cache_shape`)."""
    kv, ctx, dim = keys.shape
    tiled = np.zeros(tnn.key_cache_shape(kv, ctx, dim), keys.dtype)
    tile = tiled.shape[3]
    padded = np.zeros((kv, tiled.shape[1] * tile, dim), keys.dtype)
    padded[:, :ctx] = keys
    tiled[...] = padded.reshape(kv, -1, tile, dim).transpose(0, 1, 3, 2)
    return tiled


def test_rope_kv_write_rotates_queries_and_keys_and_writes_valid_rows_to_the_caches():
    heads, kv, dim, ctx = 9, 3, 64, 128  # the real model's heads
    cache = [kv, ctx, dim]
    kernels = entry_kernels(
        RopeKVWrite(ctx, dim),
        lambda rows: {
            "qkv": nn.spec.Tensor([rows, heads + 2 * kv, dim], "float32"),
            "k_cache": nn.spec.Tensor(tnn.key_cache_shape(kv, ctx, dim), "float32"),
            "v_cache": nn.spec.Tensor(cache, "float32"),
            "pos": int,
            **({"n_valid": int} if rows > 1 else {}),
        },
    )
    cos, sin = tnn.rotary_tables(ctx, dim, 10000.0)
    pos = 40
    for entry, rows, valid in (("decode", 1, 1), ("prefill", CHUNK, 20)):
        qkv = rng.standard_normal((rows, heads + 2 * kv, dim)).astype("float32")
        k_cache, v_cache = (rng.standard_normal(cache).astype("float32") for _ in "kv")
        c, s = cos[pos : pos + rows, None, :], sin[pos : pos + rows, None, :]
        even, odd = qkv[..., 0::2], qkv[..., 1::2]
        rotated = np.empty_like(qkv)
        rotated[..., 0::2], rotated[..., 1::2] = even * c - odd * s, even * s + odd * c
        k_ref, v_ref = k_cache.copy(), v_cache.copy()
        k_ref[:, pos : pos + valid] = rotated[:valid, heads : heads + kv].transpose(1, 0, 2)
        v_ref[:, pos : pos + valid] = qkv[:valid, heads + kv :].transpose(1, 0, 2)
        q = np.zeros((rows, heads, dim), "float32")
        args = [qkv, cos, sin, key_tiles(k_cache), v_cache, pos, valid, q]
        arrays, rule = run(kernels[entry], args)
        assert rule == "elementwise"
        assert_close(arrays[-1], rotated[:, :heads], "float32")
        # rows outside pos..pos+valid untouched
        assert_close(arrays[3], key_tiles(k_ref), "float32")
        np.testing.assert_array_equal(arrays[4], v_ref)


class SiluMultiply(nn.Module):
    def decode(self, gate_up):
        return tnn.silu_multiply(gate_up)

    prefill = decode


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_silu_multiply_of_the_gate_and_up_halves(dtype):
    kernels = entry_kernels(
        SiluMultiply(), lambda rows: {"gate_up": nn.spec.Tensor([rows, 2 * 1536], dtype)}
    )
    for entry, rows in (("decode", 1), ("prefill", CHUNK)):
        x = rng.standard_normal((rows, 2 * 1536)).astype(dtype)
        gate, up = x[:, :1536].astype("float32"), x[:, 1536:].astype("float32")
        arrays, rule = run(kernels[entry], [x, np.zeros((rows, 1536), dtype)])
        assert rule == "elementwise"
        assert_close(arrays[-1], gate / (1 + np.exp(-gate)) * up, dtype)


class LastRow(nn.Module):
    def decode(self, x, n_valid):
        return tnn.last_valid_row(x, n_valid)

    prefill = decode


def test_last_valid_row():
    func = entry_kernels(
        LastRow(), lambda rows: {"x": nn.spec.Tensor([rows, 576], "float32"), "n_valid": int}
    )["prefill"]
    x = rng.standard_normal((CHUNK, 576)).astype("float32")
    arrays, rule = run(func, [x, 7, np.zeros((1, 576), "float32")])
    assert rule == "elementwise"
    np.testing.assert_array_equal(arrays[-1], x[6:7])


# -- attention: independent (row, head) pairs ------------------------------------------------
class Attend(nn.Module):
    """Attention of 9 query heads over 3 KV heads (the real model's)."""

    def decode(self, q, kc, vc, pos):
        return tnn.attention(q, kc, vc, pos)

    prefill = decode


def numpy_attention(q, kc, vc, pos):
    """q [rows, heads, dim] over caches [kv_heads, ctx, dim] -> [rows, heads, dim]."""
    rows, heads, dim = q.shape
    group = heads // kc.shape[0]
    out = np.zeros((rows, heads, dim))
    for i in range(rows):
        for h in range(heads):
            keys, values = kc[h // group, : pos + i + 1], vc[h // group, : pos + i + 1]
            scores = keys @ q[i, h] / np.sqrt(dim)
            p = np.exp(scores - scores.max())
            out[i, h] = (p / p.sum()) @ values
    return out


@pytest.mark.parametrize(
    "entry,rows,dim,ctx,pos",
    [
        ("prefill", CHUNK, 64, 64, 5),  # positions end inside the first tile, and further
        ("decode", 1, 64, 1024, 1000),  # a long context: many tiles, the last one partial
        ("decode", 1, 40, 64, 33),  # a head dim that is no multiple of the vector width
        ("decode", 1, 63, 40, 37),  # an odd head dim; a context that ends inside a tile
        ("decode", 1, 64, 64, 2),  # fewer positions than parts: empty parts weigh nothing
    ],
)
def test_attention_parts_run_in_parallel_and_combine_to_numpy(entry, rows, dim, ctx, pos):
    keys = nn.spec.Tensor(tnn.key_cache_shape(3, ctx, dim), "float32")
    values = nn.spec.Tensor([3, ctx, dim], "float32")
    parts, combine = entry_calls(
        Attend(),
        lambda r: {"q": nn.spec.Tensor([r, 9, dim], "float32"), "kc": keys, "vc": values,
                   "pos": int},  # fmt: skip
    )[entry]
    splits = tnn.ATTENTION_SPLITS if rows == 1 else 1
    q = rng.standard_normal((rows, 9, dim)).astype("float32")
    kc = rng.standard_normal((3, ctx, dim)).astype("float32")
    vc = rng.standard_normal((3, ctx, dim)).astype("float32")
    partial = np.zeros((rows, 9, splits, dim + 2), "float32")
    (*_, partial), rule = run(parts, [q, key_tiles(kc), vc, pos, partial])
    assert rule == "independent_rows"
    (_, out), rule = run(combine, [partial, np.zeros((rows, 9 * dim), "float32")])
    assert rule == "independent_rows"
    expected = numpy_attention(q, kc, vc, pos)
    np.testing.assert_allclose(out.reshape(rows, 9, dim), expected, rtol=1e-4, atol=1e-5)


def test_attention_lane_loops_are_vectorized():
    keys = nn.spec.Tensor(tnn.key_cache_shape(3, 64, 64), "float32")
    values = nn.spec.Tensor([3, 64, 64], "float32")
    funcs = entry_calls(
        Attend(),
        lambda r: {"q": nn.spec.Tensor([r, 9, 64], "float32"), "kc": keys, "vc": values,
                   "pos": int},  # fmt: skip
    )["decode"]
    for func in funcs:
        kinds: list = []
        tvm_ffi.structural_walk(schedule_func(func, TARGET).body, (tvm.tirx.For, kinds.append))
        assert tvm.tirx.ForKind.VECTORIZED in [loop.kind for loop in kinds]


# -- fast exp -------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["exp", "sigmoid", "tanh"])
def test_fast_exp_matches_numpy(fn):
    """exp, sigmoid and tanh in llvm kernels are a polynomial: within a few ulp of the exact
    value (tanh: within 2e-7 of it, absolutely, which GELU's 1 + tanh needs)."""
    from tvm import te

    x = te.placeholder((4096,), "float32", name="x")
    y = te.compute(x.shape, lambda i: getattr(tvm.tirx, fn)(x[i]), name="y")
    func = te.create_prim_func([x, y]).with_attr("global_symbol", fn)
    xs = np.concatenate([np.linspace(-87, 88, 4090), [-200, -100, 0, 1, 100, 200]])
    xs = xs.astype("float32")
    arrays, rule = run(func, [xs, np.zeros_like(xs)])
    assert rule == "elementwise"
    exact = np.exp(np.clip(xs.astype("float64"), -700, 700))
    if fn == "sigmoid":
        np.testing.assert_allclose(arrays[1], exact / (1 + exact), rtol=1e-6, atol=1e-30)
    elif fn == "tanh":
        np.testing.assert_allclose(arrays[1], np.tanh(xs.astype("float64")), rtol=0, atol=2e-7)
    else:
        inside = (xs > -87) & (xs < 88)  # past these, exp is not a normal float32
        np.testing.assert_allclose(arrays[1][inside], exact[inside], rtol=5e-7, atol=0)


# -- convolutions (ONNX graphs: PP-OCR's CNNs), as tapml lowers a Relax graph ---------------
def graph_calls(inputs: dict[str, list[int]], body: Callable) -> list[tvm.tirx.PrimFunc]:
    """The kernels a one-function Relax graph calls, in order, lowered as tapml lowers an ONNX
    graph; `body(bb, *params)` emits the graph's ops and returns its output."""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(shape, "float32"))
              for name, shape in inputs.items()]  # fmt: skip
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    fused = lower.fuse(bb.get(), ["main"])
    funcs = lower.kernel_functions(fused)
    return [funcs[b.value.args[0].name_hint] for block in fused["main"].body.blocks
            for b in block.bindings if isinstance(b.value, tvm.relax.Call)
            and isinstance(b.value.op, tvm.ir.Op) and b.value.op.name.startswith("relax.call_tir")
            ]  # fmt: skip


def numpy_conv(x, w, stride=1, pad=0, groups=1):
    """NCHW conv2d with OIHW weights, in float64."""
    x = np.pad(x.astype("float64"), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    f, cg, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, f, oh, ow))
    per_group = f // groups
    for o in range(f):
        g = o // per_group
        for i in range(cg):
            for dy in range(kh):
                for dx in range(kw):
                    window = x[:, g * cg + i, dy : dy + stride * oh : stride,
                               dx : dx + stride * ow : stride]  # fmt: skip
                    out[:, o] += w[o, i, dy, dx] * window
    return out


def hard_swish(y):
    return y * np.clip(y + 3, 0, 6) / 6


CONVS = [
    # in channels, out channels, H, W, kernel, stride, pad, groups, epilogue: the detector's
    # 3x3 conv, a 1x1 conv over rows of no whole vector, depthwise convs (one strided, of an
    # odd width) and a strided conv of 3 channels (the first layer)
    (8, 12, 9, 24, 3, 1, 1, 1, "bias_clip"),
    (24, 20, 10, 14, 1, 1, 0, 1, "bias_hard_swish"),
    (16, 16, 18, 40, 3, 1, 1, 16, "bias_hard_swish"),
    (16, 16, 11, 32, 3, 2, 1, 16, "bias"),
    (3, 8, 12, 34, 3, 2, 1, 1, "bias_clip"),
    (4, 8, 7, 33, 3, 2, 1, 1, None),  # padded rows of an odd width: read at a stride
    (6, 6, 7, 20, 5, 1, 2, 6, None),
]


@pytest.mark.parametrize("c,f,h,w,k,stride,pad,groups,epilogue", CONVS)
def test_conv2d(c, f, h, w, k, stride, pad, groups, epilogue, target=TARGET, batch=1):
    from tvm import relax

    def body(bb, x, weight, bias):
        y = bb.emit(relax.op.nn.conv2d(x, weight, stride, pad, groups=groups))
        if epilogue is None:
            return y
        y = bb.emit(relax.op.add(y, bias))
        if epilogue == "bias_clip":
            return bb.emit(relax.op.clip(y, 0, 6))
        if epilogue == "bias_hard_swish":
            six = relax.const(6.0, "float32")
            gate = relax.op.clip(relax.op.add(y, relax.const(3.0, "float32")), 0, 6)
            return bb.emit(relax.op.multiply(y, relax.op.divide(gate, six)))
        return y

    shapes = {"x": [batch, c, h, w], "weight": [f, c // groups, k, k], "bias": [1, f, 1, 1]}
    (func,) = graph_calls(shapes, body)
    x, weight, bias = (rng.standard_normal(s).astype("float32") for s in shapes.values())
    ref = numpy_conv(x, weight, stride, pad, groups)
    if epilogue is not None:
        ref = ref + bias
    if epilogue == "bias_clip":
        ref = np.clip(ref, 0, 6)
    elif epilogue == "bias_hard_swish":
        ref = hard_swish(ref)
    args = [x, weight, *([bias] if epilogue else []), np.zeros(ref.shape, "float32")]
    arrays, rule = run(func, args, target)
    assert rule == "conv2d"
    assert_close(arrays[-1], ref, "float32")


@pytest.mark.parametrize("case", [CONVS[0], CONVS[2]])
def test_conv2d_on_a_cpu_with_narrow_vectors(case):
    test_conv2d(*case, target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}))


@pytest.mark.parametrize("case", [CONVS[0], CONVS[3]])
def test_conv2d_of_a_batch(case):
    """Each task stages its image's padded rows."""
    test_conv2d(*case, batch=2)


def test_squeeze_excitation_conv_with_an_epilogue_over_the_whole_image():
    """A 1x1 conv of a pooled [1, C, 1, 1] vector whose hard-sigmoid scales the feature map:
    the epilogue's output is larger than the conv's."""
    from tvm import relax

    def body(bb, pooled, weight, bias, features):
        y = bb.emit(relax.op.add(relax.op.nn.conv2d(pooled, weight), bias))
        scaled = relax.op.multiply(y, relax.const(0.2, "float32"))
        gate = relax.op.clip(relax.op.add(scaled, relax.const(0.5, "float32")), 0, 1)
        return bb.emit(relax.op.multiply(features, gate))

    shapes = {"pooled": [1, 24, 1, 1], "weight": [32, 24, 1, 1], "bias": [1, 32, 1, 1],
              "features": [1, 32, 20, 36]}  # fmt: skip
    (func,) = graph_calls(shapes, body)
    pooled, weight, bias, features = (rng.standard_normal(s).astype("float32")
                                      for s in shapes.values())  # fmt: skip
    gate = np.clip((numpy_conv(pooled, weight) + bias) * 0.2 + 0.5, 0, 1)
    arrays, rule = run(func, [pooled, weight, bias, features, np.zeros_like(features)])
    assert rule == "conv2d"
    assert_close(arrays[-1], features * gate, "float32")


@pytest.mark.parametrize("f,h,w,pad", [(6, 8, 20, 0), (1, 10, 16, 0), (5, 6, 9, 1)])
def test_conv2d_transpose_with_kernel_as_large_as_its_stride(f, h, w, pad):
    """The detector's upsampling: 2x2 kernels at stride 2, each output pixel one tap (with
    its bias and sigmoid; the padded one without)."""
    from tvm import relax

    def body(bb, x, weight, bias):
        y = bb.emit(relax.op.nn.conv2d_transpose(x, weight, strides=2, padding=pad))
        return y if pad else bb.emit(relax.op.sigmoid(relax.op.add(y, bias)))

    shapes = {"x": [1, 8, h, w], "weight": [8, f, 2, 2], "bias": [1, f, 1, 1]}
    (func,) = graph_calls(shapes, body)
    x, weight, bias = (rng.standard_normal(s).astype("float32") for s in shapes.values())
    ref = np.einsum("nihw,ioab->nohawb", x.astype("float64"), weight)
    ref = ref.reshape(1, f, 2 * h, 2 * w)
    if pad:
        ref = ref[:, :, pad:-pad, pad:-pad]
    else:
        ref = 1 / (1 + np.exp(-(ref + bias)))
    args = [x, weight, *([] if pad else [bias]), np.zeros(ref.shape, "float32")]
    arrays, rule = run(func, args)
    assert rule == "conv2d_transpose"
    assert_close(arrays[-1], ref, "float32")


def test_global_average_pool_and_a_mean_over_the_last_axis_are_row_reductions():
    """A mean over H and W (a sum over both axes fused), and a LayerNorm's keepdims mean (one
    input summed, no matmul)."""
    from tvm import relax

    x = rng.standard_normal((1, 12, 9, 40)).astype("float32")
    (pool,) = graph_calls({"x": [1, 12, 9, 40]},
                          lambda bb, x: bb.emit(relax.op.mean(x, [2, 3], keepdims=True)))
    arrays, rule = run(pool, [x, np.zeros((1, 12, 1, 1), "float32")])
    assert rule == "row_reduction"
    assert_close(arrays[-1], x.mean(axis=(2, 3), keepdims=True), "float32")
    y = rng.standard_normal((1, 40, 120)).astype("float32")
    (center,) = graph_calls(
        {"y": [1, 40, 120]},
        lambda bb, y: bb.emit(relax.op.subtract(y, relax.op.mean(y, [2], keepdims=True))),
    )
    arrays, rule = run(center, [y, np.zeros_like(y)])
    assert rule == "row_reduction"
    assert_close(arrays[-1], y - y.mean(axis=2, keepdims=True), "float32")
