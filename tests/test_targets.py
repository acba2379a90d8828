"""The target registry: every kernel compiles for every target, within that target's limits."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import tvm
from click.testing import CliRunner
from conftest import TINY_CHUNK, TINY_CONTEXT

from tapml.cli import main
from tapml.compiler import CompileOptions, build_plan
from tapml.errors import CompileError, TapmlError
from tapml.gguf import GGUFFile
from tapml.lower import kernel_functions
from tapml.models import ARCHITECTURES
from tapml.models.llama.config import LlamaConfig
from tapml.quantization import QUANTIZATION
from tapml.targets import TARGETS, Limits, check_bindings
from tapml.targets.gpu import build_record
from tapml.targets.llvm import int8_matmuls

GPU_TARGETS = [name for name in TARGETS if TARGETS[name].limits is not None]


def plan_kernels(config, target, quantization, max_context=TINY_CONTEXT, chunk=TINY_CHUNK):
    options = CompileOptions.resolve(target, quantization, max_context, chunk)
    _, plan, fused = build_plan(ARCHITECTURES["llama"], config, QUANTIZATION[quantization], options)
    funcs = kernel_functions(fused)
    return plan, {k: funcs[k] for k in plan.kernels}


@pytest.fixture(scope="module")
def tiny_config(tiny_gguf):
    g = GGUFFile(tiny_gguf)
    return LlamaConfig.from_gguf(g.metadata, g.tensor_names())


@pytest.mark.parametrize("target", GPU_TARGETS)
@pytest.mark.parametrize("quantization", ["q4f32_1", "q4f16_1"])
def test_every_kernel_compiles_within_the_targets_limits(tiny_config, target, quantization):
    spec = TARGETS[target]
    plan, kernels = plan_kernels(tiny_config, target, quantization)
    check_bindings(plan, spec)
    tvm_target = spec.tvm_target()
    for name, func in kernels.items():
        record = build_record(name, func, tvm_target, spec.limits)
        assert record["dispatches"], name
        for d in record["dispatches"]:
            assert d["entry"] in record["source"]
            threads = d["workgroup"][0] * d["workgroup"][1] * d["workgroup"][2]
            assert threads <= spec.limits.max_invocations


def test_a_kernel_over_the_invocation_limit_is_refused_by_name(tiny_config):
    spec = TARGETS["webgpu"]
    _, kernels = plan_kernels(tiny_config, "webgpu", "q4f32_1")
    tight = dataclasses.replace(spec.limits, max_invocations=16)
    with pytest.raises(CompileError, match=r"kernel rms_norm .* invocations.* allows 16"):
        build_record("rms_norm", kernels["rms_norm"], spec.tvm_target(), tight)


def test_a_kernel_over_the_workgroup_storage_limit_is_refused_by_name(tiny_config):
    spec = TARGETS["webgpu"]
    _, kernels = plan_kernels(tiny_config, "webgpu", "q4f32_1")
    tight = Limits(256, 64, 8, 1 << 30)
    with pytest.raises(CompileError, match=r"kernel rms_norm .* workgroup storage.* allows 64"):
        build_record("rms_norm", kernels["rms_norm"], spec.tvm_target(), tight)


def test_a_tensor_over_the_binding_limit_is_refused_by_name(tiny_config):
    plan, _ = plan_kernels(tiny_config, "webgpu", "q0f32")
    spec = dataclasses.replace(TARGETS["webgpu"], limits=Limits(256, 16384, 8, 4 << 20))
    # the f32 embedding of the tiny model is 49152 x 64 x 4 bytes = 12 MiB
    with pytest.raises(CompileError, match=r"embed_tokens.weight of 12.0 MiB; webgpu allows 4 MiB"):
        check_bindings(plan, spec)


def test_targets_command_says_what_runs_here():
    result = CliRunner().invoke(main, ["targets", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == set(TARGETS)
    assert rows["llvm"]["executes"]
    assert not rows["metal"]["executes"]  # no Mac here: generated, never called tested
    assert rows["webgpu"]["limits"]["max_invocations"] == 256
    text = CliRunner().invoke(main, ["targets"]).stdout
    assert "metal    generated, not executed" in text


@pytest.mark.real_model
@pytest.mark.parametrize("target", ["webgpu", "vulkan", "opencl"])  # cuda, metal: test_cuda_metal
def test_every_smollm2_kernel_compiles_for_every_target(target):
    from tapml.models import MODELS

    g = GGUFFile(MODELS["smollm2-135m"].gguf_path())
    config = LlamaConfig.from_gguf(g.metadata, g.tensor_names())
    spec = TARGETS[target]
    quantizations = ["q4f32_1", "q4f16_1"]  # f16 kernels compile everywhere; run where f16 is
    for quantization in quantizations:
        plan, kernels = plan_kernels(config, target, quantization, 2048, 32)
        check_bindings(plan, spec)
        for name, func in kernels.items():
            assert build_record(name, func, spec.tvm_target(), spec.limits)["dispatches"]


@pytest.mark.parametrize("target,option", [("llvm", "prefill=int4"), ("webgpu", "prefill=int8"),
                                           ("cuda", "decode=int8"), ("llvm", "decode=fp8")])
def test_int8_options_are_llvms_and_named_when_refused(target, option):
    key, _, value = option.partition("=")
    with pytest.raises(TapmlError, match=f"{option}: the llvm target takes {key}=auto"):
        CompileOptions.resolve(target, "q4f32_1", target_options={key: value})


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_int8_matmuls_are_compile_options_outside_tvms_target(stage):
    options = CompileOptions.resolve("llvm", "q4f32_1", target_options={stage: "int8"})
    assert options.target_options[stage] == "int8"  # in the cache key and the config
    assert stage not in TARGETS["llvm"].tvm_target(options.target_options).attrs
    default = CompileOptions.resolve("llvm", "q4f32_1", target_options={stage: "auto"})
    assert default == CompileOptions.resolve("llvm", "q4f32_1")  # one artifact
    float32 = CompileOptions.resolve("llvm", "q4f32_1", target_options={stage: "float32"})
    assert float32 != default and float32.target_options[stage] == "float32"


@pytest.mark.parametrize("mcpu,options,task,int8", [
    ("cascadelake", {}, "causal_lm", {"prefill", "decode"}),  # VNNI: a causal LM's default
    ("cascadelake", {}, "embedding", set()),  # an encoder stays float32 unless asked
    ("cascadelake", {"prefill": "int8"}, "embedding", {"prefill"}),
    ("cascadelake", {"decode": "float32"}, "causal_lm", {"prefill"}),
    ("cascadelake", {"prefill": "float32", "decode": "auto"}, "causal_lm", {"decode"}),
    ("skylake-avx512", {}, "causal_lm", set()),  # no VNNI
])  # fmt: skip
def test_int8_matmuls_by_default_where_the_cpu_has_vnni(mcpu, options, task, int8):
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    assert int8_matmuls(target, options, SimpleNamespace(task={"kind": task})) == int8


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_int8_asked_of_a_cpu_without_vnni_names_it(stage):
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    with pytest.raises(CompileError, match=f"{stage}=int8 needs .* skylake-avx512 has none"):
        int8_matmuls(target, {stage: "int8"}, SimpleNamespace(task={"kind": "causal_lm"}))


def test_reference_options_compute_in_float32_everywhere():
    assert TARGETS["llvm"].reference_options() == {"prefill": "float32", "decode": "float32"}
    assert all(TARGETS[t].reference_options() == {} for t in ("webgpu", "opencl", "cuda"))
