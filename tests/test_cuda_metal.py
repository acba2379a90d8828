"""cuda and metal: every kernel compiles here (CUDA to PTX with NVRTC, Metal to MSL source);
they execute only where an NVIDIA GPU or a Mac is, and say so everywhere else."""

import re
import sys

import numpy as np
import pytest

from tapml.errors import CompileError, ExecutorError
from tapml.plan import Plan
from tapml.runtime.engine import Engine
from tapml.targets import TARGETS
from tapml.targets import cuda as cuda_target
from tapml.targets import llvm as llvm_target
from tapml.targets.records import load_records

QUANTIZATIONS = ["q4f32_1", "q4f16_1"]
# NVRTC's pip packages are Linux-only dependencies (pyproject.toml)
needs_nvrtc = pytest.mark.skipif(sys.platform != "linux", reason="NVRTC from pip: Linux only")
# max |difference| / max |llvm logit|, per step, GPU against CPU
TOLERANCE = {"q4f32_1": 1e-4, "q4f16_1": 3e-2}


@pytest.fixture(scope="module")
def tiny(tiny_artifact):
    """tiny(target, quantization) -> the tiny model compiled for that target."""
    return lambda target, quantization: tiny_artifact(quantization, target)


def check_ptx(artifact):
    """Every kernel of the plan has NVRTC's PTX, with an entry for each of its dispatches, and
    the TVM library beside the records has each entry too."""
    records = load_records(artifact / "kernels_cuda.json")
    assert set(records) == set(Plan.load(artifact / "plan.json").kernels)
    library = (artifact / "kernels_cuda.so").read_bytes()
    for name, record in records.items():
        assert ".target sm_75" in record["ptx"], name
        for d in record["dispatches"]:
            assert f".visible .entry {d['entry']}(" in record["ptx"], (name, d["entry"])
            assert d["entry"].encode() in library, (name, d["entry"])


def check_msl(artifact):
    records = load_records(artifact / "kernels_metal.json")
    assert set(records) == set(Plan.load(artifact / "plan.json").kernels)
    for name, record in records.items():
        assert "#include <metal_stdlib>" in record["source"], name
        for d in record["dispatches"]:
            assert re.search(rf"kernel void {d['entry']}\(", record["source"]), (name, d["entry"])


@needs_nvrtc
def test_every_cuda_kernel_compiles_to_ptx(tiny):
    """q4f32_1 on the tiny model; q4f16_1 and the GGUF's blocks on the real one
    (test_every_smollm2_kernel_compiles)."""
    check_ptx(tiny("cuda", "q4f32_1"))


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_every_metal_kernel_has_msl(tiny, quantization):
    check_msl(tiny("metal", quantization))


@pytest.mark.parametrize("target", [pytest.param("cuda", marks=needs_nvrtc), "metal"])
def test_every_gguf_block_type_compiles(tiny_stored_artifact, target):
    """The tiny model of every block type, kept as stored: PTX for cuda, MSL for metal."""
    artifact = tiny_stored_artifact(target)
    (check_ptx if target == "cuda" else check_msl)(artifact)


@needs_nvrtc
def test_cuda_source_compiles_to_a_cubin_for_the_gpu_that_loads_it(tiny):
    # what TVM's callback does when a GPU machine loads kernels_cuda.so: a cubin for its GPU
    record = load_records(tiny("cuda", "q4f32_1") / "kernels_cuda.json")["attention"]
    assert cuda_target.nvrtc_compile(record["source"], "sm_90", "attention")[:4] == b"\x7fELF"


@needs_nvrtc
def test_tvm_compiles_cuda_with_nvrtc():
    import tvm_ffi

    cuda_target.use_nvrtc_for_tvm()
    source = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }'
    binary = bytes(tvm_ffi.get_global_func("tvm_callback_cuda_compile")(source))
    executes, _ = cuda_target.available()
    if executes:
        assert binary[:4] == b"\x7fELF"  # a cubin for this GPU
    else:
        assert binary.startswith(b"//") and b".visible .entry k(" in binary


@needs_nvrtc
def test_a_librarys_cuda_source_compiles_once_then_comes_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path))
    compiled = []

    def nvrtc(source, arch, name="kernels"):
        compiled.append(arch)
        return real(source, arch, name)

    real = cuda_target.nvrtc_compile
    monkeypatch.setattr(cuda_target, "nvrtc_compile", nvrtc)
    source = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }'
    first = cuda_target.cached_nvrtc_compile(source, "compute_75")
    assert cuda_target.cached_nvrtc_compile(source, "compute_75") == first
    assert compiled == ["compute_75"]  # the second load found it
    assert b".visible .entry k(" in first
    cuda_target.cached_nvrtc_compile(source.replace("2.0f", "3.0f"), "compute_75")
    assert compiled == ["compute_75", "compute_75"]  # other source: compiled again


@needs_nvrtc
def test_nvrtc_errors_name_the_kernel_and_give_the_log():
    with pytest.raises(CompileError, match=r"(?s)kernel broken for compute_75.*undefined"):
        cuda_target.nvrtc_compile("__global__ void k() { undefined_thing(); }", "compute_75",
                                  "broken")  # fmt: skip


@pytest.mark.parametrize("target", [pytest.param("cuda", marks=needs_nvrtc), "metal"])
def test_engine_runs_only_where_the_gpu_is(tiny, tiny_artifact, target):
    quantization = "q4f32_1"  # the artifact the tests above compiled
    artifact = tiny(target, quantization)
    module = cuda_target if target == "cuda" else llvm_target
    executes, why = module.available(TARGETS[target])
    if not executes:
        with pytest.raises(ExecutorError, match="not executed") as e:
            Engine(artifact)
        assert why in str(e.value)
        return
    # A GPU is here: the same logits as llvm, prompt and decode steps
    gpu, cpu = Engine(artifact), Engine(tiny_artifact(quantization))
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 49152, 11)]
    pairs = [(gpu.prefill(ids), cpu.prefill(ids))]
    for token in (17, 42, 4649):
        pairs.append((gpu.decode(token), cpu.decode(token)))
    for step, (g, c) in enumerate(pairs):
        assert np.isfinite(g).all(), step
        assert np.abs(g - c).max() / np.abs(c).max() < TOLERANCE[quantization], step


def test_availability_says_why():
    executes, why = cuda_target.available()
    assert isinstance(executes, bool) and why
    executes, why = llvm_target.available(TARGETS["metal"])
    assert isinstance(executes, bool) and why
    assert llvm_target.available(TARGETS["llvm"])[0]


@pytest.mark.real_model
@pytest.mark.parametrize("quantization", ["gguf", "q4f16_1"])
@pytest.mark.parametrize("target", [pytest.param("cuda", marks=needs_nvrtc), "metal"])
def test_every_smollm2_kernel_compiles(target, quantization):
    from tapml.api import ensure_compiled

    check = check_ptx if target == "cuda" else check_msl
    check(ensure_compiled("smollm2-135m", target, quantization, progress=False))
