"""The webgpu and vulkan executors on wgpu's adapter here (Mesa lavapipe in CI): they must
agree with the llvm executor, run grids folded into blockIdx.z exactly, refuse what the
device cannot do with a clear error, and name a kernels file that is corrupt."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_CONTEXT, assert_close, greedy_trace

from tapml.artifact import Artifact
from tapml.errors import ExecutorError, TapmlError
from tapml.plan import Plan
from tapml.runtime.engine import Engine
from tapml.targets import TARGETS

PROMPT_IDS = list(range(100, 113))  # 13 tokens: two prefill chunks of 8, the last padded
DECODE_STEPS = 5
RTOL = 1e-4  # max |wgpu - llvm| over max |llvm|, per logits vector (float32 both sides)
RTOL_F16 = 1e-2  # the same for q4f16_1: float16 activations, rounded in another order


@pytest.fixture(scope="module")
def adapter():
    from tapml.targets.webgpu import _adapter, available

    ok, why = available(TARGETS["webgpu"])
    if not ok:
        pytest.skip(f"no wgpu adapter: {why}")
    return _adapter(TARGETS["webgpu"])


@pytest.fixture(scope="module")
def gpu_artifact(adapter, tiny_artifact):
    """gpu_artifact(target, quantization) -> the tiny model compiled for webgpu or vulkan."""
    return lambda target, quantization="q4f32_1": tiny_artifact(quantization, target)


def trace(artifact) -> tuple[list[np.ndarray], list[int]]:
    return greedy_trace(Engine(artifact), PROMPT_IDS, DECODE_STEPS)


def test_available_names_the_adapter(adapter):
    from tapml.targets.webgpu import available

    ok, note = available(TARGETS["webgpu"])
    assert ok and adapter.info["device"] in note


@pytest.mark.parametrize("target", ["webgpu", "vulkan"])
def test_logits_and_greedy_ids_match_llvm(gpu_artifact, tiny_artifact, target):
    from tapml.targets.webgpu import available

    ok, why = available(TARGETS[target])
    if not ok:
        pytest.skip(f"no {target} adapter: {why}")
    gpu_logits, gpu_ids = trace(gpu_artifact(target))
    llvm_logits, llvm_ids = trace(tiny_artifact("q4f32_1"))
    assert gpu_ids == llvm_ids
    assert_close(gpu_logits, llvm_logits, RTOL)


@pytest.mark.parametrize("target", ["webgpu", "vulkan"])
def test_every_gguf_block_type_kept_as_stored_matches_llvm(adapter, tiny_stored_artifact, target):
    from tapml.targets.webgpu import available

    ok, why = available(TARGETS[target])
    if not ok:
        pytest.skip(f"no {target} adapter: {why}")
    gpu_logits, gpu_ids = trace(tiny_stored_artifact(target))
    llvm_logits, llvm_ids = trace(tiny_stored_artifact("llvm"))
    assert gpu_ids == llvm_ids
    assert_close(gpu_logits, llvm_logits, RTOL)


def test_f16_logits_match_llvm(adapter, gpu_artifact, tiny_artifact):
    if "shader-f16" not in adapter.features:
        pytest.skip("the adapter has no shader-f16")
    gpu_logits, gpu_ids = trace(gpu_artifact("webgpu", "q4f16_1"))
    llvm_logits, llvm_ids = trace(tiny_artifact("q4f16_1"))
    assert gpu_ids == llvm_ids
    assert_close(gpu_logits, llvm_logits, RTOL_F16)


def test_reset_state_zeroes_the_kv_cache(gpu_artifact):
    engine = Engine(gpu_artifact("webgpu"))
    first = engine.prefill(PROMPT_IDS)
    engine.reset()
    assert not engine.executor.download("k_cache_0").any()
    np.testing.assert_array_equal(engine.prefill(PROMPT_IDS), first)


def test_time_call_launches_one_call(gpu_artifact):
    engine = Engine(gpu_artifact("webgpu"))
    executor, calls = engine.executor, engine.plan.functions["decode"]["calls"]
    index, write = next(
        (i, c) for i, c in enumerate(calls) if c["kernel"].startswith("rope_kv_write")
    )
    row, cache = write["args"][0]["buffer"], write["args"][4]["buffer"]  # QKV in, V cache
    b = engine.plan.buffers[row]
    values = np.arange(np.prod(b["shape"]), dtype=b["dtype"]).reshape(b["shape"]) + 1
    kv_heads = engine.plan.buffers[cache]["shape"][0]
    v_row = values[0, -kv_heads:].reshape(-1)  # the V heads come last in QKV, copied as they are
    executor.upload(row, values)
    assert executor.time_call("decode", index, {"pos": 3}) > 0
    rows = executor.download(cache).transpose(1, 0, 2).reshape(TINY_CONTEXT, -1)
    np.testing.assert_array_equal(rows[3], v_row)
    assert not rows[4].any()


def test_f16_needs_shader_f16(gpu_artifact, monkeypatch):
    from tapml.targets.webgpu import WebGPUExecutor, _adapter

    artifact = gpu_artifact("webgpu", "q4f16_1")
    monkeypatch.setattr(type(_adapter(TARGETS["webgpu"])), "features", property(lambda _: set()))
    with pytest.raises(ExecutorError, match="no shader-f16.*--quantization q4f32_1"):
        WebGPUExecutor(Plan.load(artifact / "plan.json"), artifact / "kernels_webgpu.json",
                       TARGETS["webgpu"])  # fmt: skip


def test_missing_limit_is_named(gpu_artifact, monkeypatch):
    from tapml.targets.webgpu import WebGPUExecutor, _adapter

    artifact = gpu_artifact("vulkan")
    adapter_type = type(_adapter(TARGETS["vulkan"]))
    limits = adapter_type.limits.fget
    small = property(lambda a: {**limits(a), "max-compute-invocations-per-workgroup": 256})
    monkeypatch.setattr(adapter_type, "limits", small)
    with pytest.raises(ExecutorError, match="max-compute-invocations-per-workgroup = 256.*1024"):
        WebGPUExecutor(Plan.load(artifact / "plan.json"), artifact / "kernels_vulkan.json",
                       TARGETS["vulkan"])  # fmt: skip


def test_corrupt_kernels_file_is_named(gpu_artifact, tmp_path):
    from tapml.targets.webgpu import WebGPUExecutor

    artifact = tmp_path / "copy"
    shutil.copytree(gpu_artifact("webgpu"), artifact)
    plan, kernels = Plan.load(artifact / "plan.json"), artifact / "kernels_webgpu.json"
    document = json.loads(kernels.read_text())
    del document["kernels"]["rms_norm"]["dispatches"][0]["grid"]
    kernels.write_text(json.dumps(document))
    with pytest.raises(ExecutorError, match=r"kernels_webgpu.json: kernel 'rms_norm' has a bad"):
        WebGPUExecutor(plan, kernels, TARGETS["webgpu"])
    kernels.write_text(json.dumps(document)[:1000])
    with pytest.raises(TapmlError, match=r"kernels_webgpu.json: 1000 bytes, .* \(truncated\)"):
        Engine(artifact)  # its checksum first
    Artifact(artifact).write_checksums()  # as if compiled so
    with pytest.raises(ExecutorError, match="kernels_webgpu.json is corrupt"):
        Engine(artifact)


# -- grids over 65535 workgroups: TVM folds x into blockIdx.z ------------------------------
COUNT_WGSL = """
@group(0) @binding(0) var<storage, read_write> counts : array<atomic<u32>>;

struct PODArgs {
  n: i32,
  packGridDimX: u32
}
@group(0) @binding(1) var<uniform> podArgs : PODArgs;

@compute @workgroup_size(1, 1, 1)
fn count_kernel(
  @builtin(workgroup_id) blockIdx : vec3<u32>,
  @builtin(num_workgroups) gridDim : vec3<u32>
) {
  if (blockIdx.z * gridDim.x + blockIdx.x GUARD podArgs.packGridDimX) { return; }
  atomicAdd(&counts[0], 1u);
  atomicMax(&counts[1], blockIdx.z * gridDim.x + blockIdx.x);
  atomicStore(&counts[2], u32(podArgs.n));
}
"""


def run_one_kernel(tmp_path, record: dict, buffers: dict, args: list, scalars: dict):
    """An executor over a one-call plan of `record`, run once; returns it and the output."""
    from tapml.targets.webgpu import WebGPUExecutor

    name = next(iter(buffers))
    calls = [{"kernel": "k", "args": args, "writes": [name]}]
    plan = Plan(buffers, {}, {"main": {"scalars": list(scalars), "calls": calls,
                                       "outputs": [name]}}, {"dtype": "float32"})  # fmt: skip
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"format": "tapml-kernels", "version": 1, "target": "webgpu",
                                "tvm_target": "", "kernels": {"k": record}}))  # fmt: skip
    executor = WebGPUExecutor(plan, path, TARGETS["webgpu"])
    return executor, executor.run("main", scalars, {})


@pytest.mark.parametrize("guard", [">", ">="])
@pytest.mark.parametrize("n", [131072, 131073, 65535 * 3])  # folds with and without padding
def test_folded_grid_runs_each_workgroup_once(adapter, tmp_path, guard, n):
    dispatch = {"entry": "count_kernel", "writable": [1], "grid": [{"var": "n"}, 1, 1],
                "workgroup": [1, 1, 1], "shared_bytes": 0,
                "args": [{"buffer": 0}, {"pod": "int64", "expr": {"var": "n"}}]}  # fmt: skip
    record = {"params": ["counts", "n"], "source": COUNT_WGSL.replace("GUARD", guard),
              "dispatches": [dispatch]}  # fmt: skip
    buffers = {"counts": {"kind": "state", "shape": [4], "dtype": "uint32"}}
    args = [{"buffer": "counts"}, {"scalar": {"var": "total"}}]
    executor, counts = run_one_kernel(tmp_path, record, buffers, args, {"total": n})
    assert counts.tolist() == [n, n - 1, n, 0]  # the int64 POD arrives as WGSL's i32
    executor.reset_state()
    executor.time_call("main", 0, {"total": 7})
    assert executor.download("counts").tolist() == [7, 6, 7, 0]


def test_folded_grid_of_a_tvm_kernel(adapter, tmp_path):
    """A TVM elementwise kernel of 65537 workgroups: folded, padded, without a bounds check."""
    from tvm import te

    from tapml.targets.gpu import build_record

    size = 65537 * 256
    out = te.compute((size,), lambda i: i * 3 + 1, name="out")
    spec = TARGETS["webgpu"]
    record = build_record("k", te.create_prim_func([out]), spec.tvm_target(), spec.limits)
    assert record["dispatches"][0]["grid"][0] == 65537
    buffers = {"out": {"kind": "output", "shape": [size], "dtype": "int32"}}
    _, got = run_one_kernel(tmp_path, record, buffers, [{"buffer": "out"}], {})
    np.testing.assert_array_equal(got, np.arange(size, dtype=np.int32) * 3 + 1)
