"""GGUF's block formats kept as stored: transcoding is lossless (gguf's own dequantization, bit
for bit), every executable target's dequantize path (the embedding lookup) reads the exact
values, and the fused matmuls (decode GEMV, prefill GEMM) equal a float64 product."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from gguf_blocks import BLOCK_TYPES, random_blocks
from plan_module import executor_for, runs_here
from tvm.relax.frontend import nn

from tapml import nn as tnn
from tapml.errors import TapmlError
from tapml.gguf import GGUFFile
from tapml.gguf_formats import BLOCK_FORMATS
from tapml.models import MODELS
from tapml.quantization import QUANTIZATION
from tapml.source import SourceTensor

TYPES = BLOCK_TYPES
# rows not a multiple of any vector width; rows of 25 blocks of 32 (an odd number of scales),
# or of 3 super-blocks of 256
SHAPES = {kind: (37, 768 if kind.endswith("_K") else 800) for kind in TYPES}
GEMM_ROWS = 8
MATMUL_RTOL = 1e-5  # float32 kernels against a float64 product of the same weights
EXECUTORS = ["llvm", "webgpu", "opencl"]


def stored(kind: str, raw: np.ndarray, cols: int) -> SourceTensor:
    return SourceTensor("w", kind, (raw.shape[0], cols), lambda: raw,
                        lambda: dequantize(raw, GGMLQuantizationType[kind]))  # fmt: skip


def bits(planes: dict[str, np.ndarray], count: int) -> float:
    return 8 * sum(p.nbytes for p in planes.values()) / count


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("rows", [1, 37])
def test_transcoding_is_lossless_and_at_most_half_a_bit_larger(kind, rows):
    cols = SHAPES[kind][1]
    raw = random_blocks(kind, rows, cols)
    fmt = BLOCK_FORMATS[kind]
    planes = fmt.encode(stored(kind, raw, cols))
    assert {p: (a.shape, str(a.dtype)) for p, a in planes.items()} == {
        p: (shape, dtype) for p, (shape, dtype) in fmt.planes((rows, cols)).items()
    }
    want = dequantize(raw, GGMLQuantizationType[kind])
    np.testing.assert_array_equal(fmt.dequantize(planes).view(np.uint32), want.view(np.uint32))
    assert bits(planes, rows * cols) <= 8 * raw.nbytes / (rows * cols) + 0.5


@pytest.mark.real_model
def test_smollm2_tensors_transcode_losslessly():
    g = GGUFFile(MODELS["smollm2-135m"].gguf_path())
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_down.weight",
                 "blk.29.ffn_gate.weight"]:  # fmt: skip
        source = g.source(name)
        fmt = BLOCK_FORMATS[source.stored]
        assert source.stored in ("Q4_1", "Q8_0")
        got = fmt.dequantize(fmt.encode(source))
        np.testing.assert_array_equal(got.view(np.uint32), g.tensor(name).view(np.uint32))


def test_a_type_that_cannot_be_kept_is_named_with_the_fix():
    with pytest.raises(TapmlError, match=r"blk.0.ffn_down.weight is stored as IQ2_XS.*q4f32_1"):
        QUANTIZATION["gguf"].format_for("IQ2_XS", "blk.0.ffn_down.weight")


class TiedWeight(nn.Module):
    """One weight as an embedding: its lookup (the dequantize path) and its use as an output
    layer (the fused matmul)."""

    def __init__(self, fmt, rows: int, cols: int):
        self.embed = tnn.Embedding(rows, cols, fmt, "float32")

    def decode(self, ids, x):
        return self.embed(ids), self.embed.project(x)

    prefill = decode


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """tied(kind, target) -> (executor, planes, float64 weight, rows, cols), compiled once."""
    made = {}

    def get(kind: str, target: str):
        ok, why = runs_here(target)
        if not ok:
            pytest.skip(f"{target} does not execute here: {why}")
        if (kind, target) not in made:
            rows, cols = SHAPES[kind]
            specs = {
                "decode": {"ids": nn.spec.Tensor([rows], "int32"),
                           "x": nn.spec.Tensor([1, cols], "float32")},
                "prefill": {"ids": nn.spec.Tensor([rows], "int32"),
                            "x": nn.spec.Tensor([GEMM_ROWS, cols], "float32")},
            }  # fmt: skip
            fmt = BLOCK_FORMATS[kind]
            executor = executor_for(TiedWeight(fmt, rows, cols), specs, target,
                                    tmp_path_factory.mktemp(f"{kind}-{target}"))  # fmt: skip
            raw = random_blocks(kind, rows, cols, seed=1)
            planes = fmt.encode(stored(kind, raw, cols))
            executor.load_params({f"embed.{p}": a for p, a in planes.items()})
            weight = dequantize(raw, GGMLQuantizationType[kind])
            made[kind, target] = executor, weight
        return made[kind, target]

    return get


@pytest.mark.parametrize("target", EXECUTORS)
@pytest.mark.parametrize("kind", TYPES)
def test_dequantize_path_and_fused_matmuls(tied, kind, target):
    executor, weight = tied(kind, target)
    rows, cols = weight.shape
    rng = np.random.default_rng(2)
    for entry, x_rows in (("decode", 1), ("prefill", GEMM_ROWS)):
        x = rng.standard_normal((x_rows, cols)).astype(np.float32)
        ids = np.arange(rows, dtype=np.int32)[::-1].copy()
        looked_up = executor.run(entry, {}, {f"{entry}.ids": ids, f"{entry}.x": x})
        np.testing.assert_array_equal(looked_up.view(np.uint32), weight[ids].view(np.uint32))
        product = executor.download(executor.plan.functions[entry]["outputs"][1])
        want = x.astype(np.float64) @ weight.astype(np.float64).T
        error = np.abs(product - want).max() / np.abs(want).max()
        assert error <= MATMUL_RTOL, f"{entry}: relative error {error:.2e}"


@pytest.mark.real_model
@pytest.mark.parametrize("target", EXECUTORS)
def test_smollm2_embedding_rows_are_gguf_exact_on_every_target(tmp_path, target):
    """The real Q8_0 embedding (49152 x 576) through the lookup: sampled rows, bit for bit."""
    ok, why = runs_here(target)
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")
    g = GGUFFile(MODELS["smollm2-135m"].gguf_path())
    source = g.source("token_embd.weight")
    rows, cols = source.shape
    fmt = BLOCK_FORMATS[source.stored]

    class Lookup(nn.Module):
        def __init__(self):
            self.embed = tnn.Embedding(rows, cols, fmt, "float32")

        def decode(self, ids):
            return self.embed(ids)

        prefill = decode

    ids = np.random.default_rng(3).integers(0, rows, 64).astype(np.int32)
    ids[:2] = [0, rows - 1]
    specs = {e: {"ids": nn.spec.Tensor([len(ids)], "int32")} for e in ("decode", "prefill")}
    executor = executor_for(Lookup(), specs, target, tmp_path)
    executor.load_params({f"embed.{p}": a for p, a in fmt.encode(source).items()})
    got = executor.run("prefill", {}, {"prefill.ids": ids})
    want = g.tensor("token_embd.weight")[ids]
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
