"""`tapml bench` on the tiny model: the figures it reports and how they are computed."""

import functools
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tapml import bench, startup
from tapml.cli import main
from tapml.errors import TapmlError
from tapml.plan import Plan
from tapml.targets import llvm

KEYS = ["decode_tok_s", "prefill_tok_s", "peak_rss_mb", "bandwidth_gb_s"]
STARTUP = ["load_s", "ttft_s", "process_s", "startup_rss_mb"]
SMALL = ["--prompt-tokens", "12", "--decode-tokens", "4"]


@pytest.fixture
def small_bandwidth_probe(monkeypatch):
    """A 16 MiB bandwidth probe instead of 512 MiB, and TVM_NUM_THREADS restored afterwards."""
    probe = functools.partial(bench.machine_bandwidth_gb_s, nbytes=16 * 2**20, repeats=1)
    monkeypatch.setattr(bench, "machine_bandwidth_gb_s", probe)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)


def test_json_has_every_figure(tiny_artifact, small_bandwidth_probe):
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact()), *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert list(figures)[:6] == [*KEYS, "machine_bandwidth_gb_s", "threads"]
    for key in [*KEYS, "machine_bandwidth_gb_s", *STARTUP]:
        assert figures[key] > 0, key
    # the fresh process was ready before it finished, and generated after it was ready
    assert figures["load_s"] + figures["ttft_s"] < figures["process_s"]
    assert figures["threads"] == llvm.tvm_threads()
    assert "llama_cpp" not in figures
    assert figures["bandwidth_gb_s"] == pytest.approx(
        figures["decode_bytes_per_token"] * figures["decode_tok_s"] / 1e9
    )


def test_decode_bytes_are_the_params_the_decode_function_reads(tiny_artifact):
    plan = Plan.load(tiny_artifact() / "plan.json")
    # the tiny model's decode step reads every parameter (tied embeddings: the table is the
    # head), RoPE's tables a row
    weights = [n for n in plan.names("param") if not n.endswith((".cos", ".sin"))]
    assert len(weights) < len(plan.names("param"))
    assert bench.decode_param_bytes(plan) == sum(plan.nbytes(n) for n in weights)

    def buffer(kind, shape, **extra):
        return {"kind": kind, "shape": shape, "dtype": "float32", **extra}

    def call(*buffers, kernel="k"):
        return {"kernel": kernel, "args": [{"buffer": b} for b in buffers] + [{"scalar": 1}]}

    def take(table):  # an untied embedding: a row a token
        return call(table, kernel="fused_dequantize_take")

    plan = Plan(
        buffers={
            "w": buffer("param", [4, 8]),
            "w_row": buffer("view", [8], base="w"),
            "prefill_only": buffer("param", [100]),
            "table": buffer("param", [1000, 8]),
            "angles": buffer("param", [1000, 4]),
            "kv": buffer("state", [1000]),
        },
        storages={},
        functions={
            "decode": {"calls": [take("table"), call("w_row", "kv"), call("w_row"),
                                 call("angles", "kv", kernel="rope_kv_write")]},
            "prefill": {"calls": [call("w", "prefill_only", "kv")]},
        },
        model={},
        task={"kind": "causal_lm", "decode": {"function": "decode"}},
    )
    assert bench.decode_param_bytes(plan) == 4 * 8 * 4  # w once, through its view; no table


def test_kv_bytes_are_the_positions_each_decode_step_reads(tiny_artifact):
    plan = Plan.load(tiny_artifact() / "plan.json")
    caches = plan.names("state")
    heads, context, dim = plan.buffers["v_cache_0"]["shape"]
    per_position = len(caches) * heads * dim * 4  # float32 keys and values of every layer
    # steps at positions 10, 11, 12 read 11, 12 and 13 positions
    assert bench.decode_kv_bytes(plan, 10, 3) == pytest.approx(per_position * 12)


def test_bandwidth_probe_kernel_reads_every_value_of_every_row():
    import tvm

    rows = 9  # more rows than the prefetch distance, and an odd count
    data = np.random.default_rng(0).standard_normal((rows, bench._PROBE_ROW_BYTES // 4))
    data = data.astype("float32")
    out = tvm.runtime.empty((rows, 16), "float32", tvm.cpu())
    bench._probe_kernel(rows)(tvm.runtime.tensor(data), out)
    np.testing.assert_array_equal(out.numpy(), data.reshape(rows, -1, 16).max(axis=1))


def test_machine_bandwidth_is_positive_on_any_thread_count():
    assert bench.machine_bandwidth_gb_s(threads=1, nbytes=2**20, repeats=1) > 0
    assert bench.machine_bandwidth_gb_s(threads=3, nbytes=2**20, repeats=1) > 0


def test_compare_without_llama_cpp_says_how_to_install_it(tiny_artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    args = ["bench", str(tiny_artifact()), *SMALL, "--compare", "llama.cpp"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "pip install llama-cpp-python" in result.output


def test_threads_reach_the_tvm_thread_pool(monkeypatch):
    before = llvm.tvm_threads()
    monkeypatch.setenv("TVM_NUM_THREADS", str(before))  # restored after the test
    try:
        # a running pool narrows (`tapml bench --threads N` sets it before the pool starts)
        assert llvm.set_threads(1) == 1 == llvm.tvm_threads()
        with pytest.raises(TapmlError, match="cannot grow to"):
            llvm.set_threads(before + 1)
    finally:
        llvm.set_threads(before)


def test_llama_cpp_runs_the_same_gguf(tiny_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the bench extra")
    figures = bench.run_llama_cpp(tiny_gguf, list(range(100, 112)), decode_tokens=4, threads=1)
    for key in KEYS:
        assert figures[key] is None or figures[key] > 0, key


def test_llama_cpp_starts_up_in_a_fresh_process(tiny_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the bench extra")
    figures = bench.startup(startup.probe_llama_cpp(tiny_gguf, threads=1))
    assert all(figures[key] > 0 for key in STARTUP)
    assert figures["load_s"] + figures["ttft_s"] < figures["process_s"]
