"""The opencl executor on whatever OpenCL device is here (PoCL's CPU device in CI): it must
agree with the llvm executor, refuse fp16 models on devices without fp16, and name a kernel
whose source does not build."""

import json
import shutil

import numpy as np
import pytest
from conftest import assert_close, greedy_trace

from tapml.artifact import Artifact
from tapml.errors import ExecutorError
from tapml.runtime.engine import Engine
from tapml.targets import TARGETS
from tapml.targets.executor import Executor

SPEC = TARGETS["opencl"]
PROMPT_IDS = list(range(100, 113))  # 13 tokens: two prefill chunks of 8, the last padded
DECODE_STEPS = 6
RTOL = 1e-4  # max |opencl - llvm| over max |llvm|, per logits vector (float32 both sides)


@pytest.fixture(scope="module")
def device():
    from tapml.targets.opencl import available

    ok, why = available(SPEC)
    if not ok:
        pytest.skip(f"no OpenCL device: {why}")
    from tapml.targets.opencl import pick_device

    return pick_device()[1]


@pytest.fixture(scope="module")
def cl_artifact(device, tiny_artifact):
    """cl_artifact(quantization) -> the tiny model compiled for opencl."""
    return lambda quantization="q4f32_1": tiny_artifact(quantization, "opencl")


def trace(artifact) -> tuple[list[np.ndarray], list[int]]:
    return greedy_trace(Engine(artifact), PROMPT_IDS, DECODE_STEPS)


def test_available_names_the_device(device):
    from tapml.targets.opencl import available

    ok, note = available(SPEC)
    assert ok and device.name.strip() in note


def test_logits_and_greedy_ids_match_llvm(cl_artifact, tiny_artifact):
    cl_logits, cl_ids = trace(cl_artifact("q4f32_1"))
    llvm_logits, llvm_ids = trace(tiny_artifact("q4f32_1"))
    assert cl_ids == llvm_ids
    assert_close(cl_logits, llvm_logits, RTOL)


def test_every_gguf_block_type_kept_as_stored_matches_llvm(device, tiny_stored_artifact):
    cl_logits, cl_ids = trace(tiny_stored_artifact("opencl"))
    llvm_logits, llvm_ids = trace(tiny_stored_artifact("llvm"))
    assert cl_ids == llvm_ids
    assert_close(cl_logits, llvm_logits, RTOL)


def test_prepared_run_equals_per_call_launches(cl_artifact):
    engine = Engine(cl_artifact("q4f32_1"))
    engine.prefill(PROMPT_IDS)
    executor, scalars = engine.executor, {"pos": len(PROMPT_IDS)}
    token = {"decode.token": np.array([7], "int32")}
    prepared = executor.run("decode", scalars, token)
    # the base class's run launches each call through _launch, rebinding every argument
    launched = Executor.run(executor, "decode", scalars, token)
    np.testing.assert_array_equal(prepared, launched)
    assert executor.time_call("decode", 0, scalars) > 0


def test_fp16_model_needs_fp16_device(device, cl_artifact, tiny_artifact):
    from tapml.targets.opencl import has_fp16

    artifact = cl_artifact("q4f16_1")
    if not has_fp16(device):
        with pytest.raises(ExecutorError, match=r"no fp16.*--quantization q4f32_1"):
            Engine(artifact)
        return
    cl_logits, cl_ids = trace(artifact)
    llvm_logits, llvm_ids = trace(tiny_artifact("q4f16_1"))
    assert cl_ids == llvm_ids
    assert_close(cl_logits, llvm_logits, 1e-2)


def test_kernel_that_does_not_build_is_named(cl_artifact, tmp_path):
    artifact = tmp_path / "corrupt"
    shutil.copytree(cl_artifact("q4f32_1"), artifact)
    path = artifact / SPEC.kernels
    document = json.loads(path.read_text())
    name = "rms_norm"
    document["kernels"][name]["source"] += "\n__kernel void broken() { undeclared = 1; }\n"
    path.write_text(json.dumps(document))
    Artifact(artifact).write_checksums()  # a kernel compiled wrong, not a damaged file
    with pytest.raises(ExecutorError, match=rf"kernel {name} does not build(.|\n)*undeclared"):
        Engine(artifact)


def test_device_choice_by_environment(device, monkeypatch):
    from tapml.targets.opencl import pick_device

    monkeypatch.setenv("TAPML_OPENCL_DEVICE", "0")
    assert pick_device()[1] is not None
    monkeypatch.setenv("TAPML_OPENCL_DEVICE", device.name.strip()[:6])
    assert pick_device()[1].name == device.name
    monkeypatch.setenv("TAPML_OPENCL_DEVICE", "no such device")
    with pytest.raises(ExecutorError, match="matches no OpenCL device"):
        pick_device()
