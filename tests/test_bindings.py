"""Weights larger than a binding, split into row ranges (tapml.nn.bindings): the split layers
compute what the whole ones do, on the real Qwen2.5 output matrix, in a fused projection with
a bias, and in a tiny model whose limit is lowered until its embedding and output matrix split."""

from __future__ import annotations

import numpy as np
import pytest
from plan_module import executor_for, runs_here
from tiny_gguf import write_tiny_gguf
from tvm.relax.frontend import nn

from tapml import nn as tnn
from tapml.compiler import CompileOptions, compile_model
from tapml.errors import CompileError
from tapml.formats import FLOAT32
from tapml.gguf import GGUFFile
from tapml.gguf_formats import BLOCK_FORMATS
from tapml.nn.bindings import row_bounds, split_bindings
from tapml.quantization import dequantize_params, split_rows
from tapml.runtime.engine import Engine
from tapml.targets import binding_limit
from tapml.weights import load_shards

rng = np.random.default_rng(0)


def test_row_bounds_are_the_fewest_aligned_ranges_within_the_limit():
    # Qwen2.5's Q8_0 output matrix: 151936 rows of 896 bytes of 4-bit words
    assert row_bounds(151936, 896, 128 << 20) == [0, 75968, 151936]  # 1187 x 64 rows
    assert row_bounds(100, 10, 1000) == [0, 100]
    assert row_bounds(1000, 10, 3000) == [0, 256, 512, 768, 1000]  # aligned to 64 rows
    assert row_bounds(1000, 10, 2550) == [0, 250, 500, 750, 1000]  # 256 rows would not fit
    with pytest.raises(CompileError, match="one row of 40 bytes"):
        row_bounds(10, 40, 32)


class _Output(nn.Module):
    """A lookup and an output layer over the same table, and a fused projection."""

    def __init__(self, vocab: int, dim: int, fmt):
        self.embed = tnn.Embedding(vocab, dim, fmt, "float32")
        self.head = tnn.Linear(dim, [vocab - 8, 8], fmt, bias="float32")

    def decode(self, ids, x):
        return self.embed(ids), self.embed.project(x), self.head(x)

    prefill = decode


def _run(module, params, inputs, target, tmp_path):
    ok, why = runs_here(target)
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")
    specs = {n: nn.spec.Tensor(list(a.shape), str(a.dtype)) for n, a in inputs.items()}
    executor = executor_for(module, {"decode": specs, "prefill": specs}, target, tmp_path)
    executor.load_params(params)
    out = executor.run("decode", {}, {f"decode.{n}": a for n, a in inputs.items()})
    return out if isinstance(out, list | tuple) else [out]


@pytest.mark.parametrize("target", ["llvm", "webgpu"])
def test_split_layers_compute_what_whole_ones_do(target, tmp_path):
    vocab, dim = 300, 64  # rows of 256 bytes; a 20 KiB limit splits both into 4 pieces
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    params = {"embed.weight": table, "head.weight": table,
              "head.bias": rng.standard_normal(vocab).astype(np.float32)}  # fmt: skip
    inputs = {"ids": np.array([0, 77, 78, 299, 150], "int32"),
              "x": rng.standard_normal((5, dim)).astype(np.float32)}  # fmt: skip
    whole = _run(_Output(vocab, dim, FLOAT32), params, inputs, target, tmp_path / "whole")

    split = _Output(vocab, dim, FLOAT32)
    bounds = [0, 75, 150, 225, 300]  # 4 x 75 rows of 256 bytes (128 would not fit)
    assert split_bindings(split, 20 << 10) == {"embed": bounds, "head": bounds}
    splits = {"embed": bounds, "head": bounds}
    pieces = dict(split_rows(params.items(), splits))
    assert "embed.weight" not in pieces and "embed.rows.3.weight" in pieces
    got = _run(split, pieces, inputs, target, tmp_path / "split")
    for a, b in zip(got, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # and the weights join back to the whole
    joined = dequantize_params(pieces, {"embed": ["float32"], "head": ["float32"]})
    np.testing.assert_array_equal(joined["embed.weight"], table)


@pytest.mark.real_model
def test_qwen_output_matrix_split_gives_the_unsplit_result(qwen_gguf, tmp_path):
    """The real Q8_0 output matrix of Qwen2.5 (138 MiB of 4-bit words), over WebGPU's limit."""
    source = GGUFFile(qwen_gguf).source("output.weight")
    fmt = BLOCK_FORMATS[source.stored]
    planes = fmt.encode(source)
    rows, dim = source.shape
    assert max(a.nbytes for a in planes.values()) > binding_limit()

    class Head(nn.Module):
        def __init__(self):
            self.lm_head = tnn.Linear(dim, rows, fmt)

        def decode(self, x):
            return self.lm_head(x)

        prefill = decode

    x = {"x": rng.standard_normal((2, dim)).astype(np.float32)}
    params = {f"lm_head.{p}": a for p, a in planes.items()}
    (whole,) = _run(Head(), params, x, "llvm", tmp_path / "whole")
    head = Head()
    splits = split_bindings(head, binding_limit())
    assert list(splits) == ["lm_head"] and len(splits["lm_head"]) == 3
    (got,) = _run(head, dict(split_rows(params.items(), splits)), x, "llvm", tmp_path / "split")
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_model_split_by_a_lowered_limit_gives_the_same_logits(tmp_path, tied):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    logits = {}
    for limit in (0, 256 << 10):  # the 1.5 MiB table in 6 pieces
        options = CompileOptions.resolve("llvm", "q4f32_1", 64, 8, kv_cache="float32",
                                         max_binding=limit)  # fmt: skip
        out = compile_model(gguf, tmp_path / f"limit{limit}", options, progress=False)
        engine = Engine(out)
        engine.reset()
        logits[limit] = [engine.prefill([5, 17, 300, 2]), engine.decode(9)]
        if limit:
            split = engine.plan.model["row_splits"]
            assert set(split) == {"embed_tokens"} | (set() if tied else {"lm_head"})
            assert len(split["embed_tokens"]) == 7
            names = load_shards(out / "weights")
            assert "embed_tokens.rows.1.q_weight" in names
    for a, b in zip(logits[256 << 10], logits[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
