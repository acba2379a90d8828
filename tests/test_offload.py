"""Offloading: a plan split between the source (llvm) and a target gives the source's logits,
bisection names a planted bad kernel within ceil(log2 N) + 2 evaluation runs, finished steps
are not run again, and on the real model the whole method migrates SmolLM2 to webgpu through
a device agent while a broken kernel is found and confirmed by its carved tests."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from broken_kernel import shift_position

from tapml.artifact import Artifact
from tapml.carving import offload
from tapml.carving.offload import Offloader, SplitRun, forward, kernel_order
from tapml.carving.runs import schedule
from tapml.carving.scenarios import Scenario
from tapml.plan import KERNEL_KINDS, CausalLM, Plan
from tapml.targets import load_executor
from tapml.weights import load_shards

SCENARIO = Scenario("short", "", "The capital of France is", chat=False, decode_steps=4)
PROMPT = list(range(100, 113))  # two prefill chunks of 8, the last one padded


def executor(artifact: Path, target: str):
    plan = Plan.load(artifact / "plan.json")
    ex = load_executor(target, plan, artifact)
    ex.load_params(load_shards(artifact / "weights"))
    return ex


def broken_copy(artifact: Path, kernel: str, out: Path) -> Path:
    """The webgpu artifact with an off-by-one position in `kernel` (an honest bug)."""
    shutil.copytree(artifact, out)
    shift_position(out, kernel)
    Artifact(out).write_checksums()  # a kernel compiled wrong, not a damaged file
    return out


@pytest.fixture(scope="module")
def split_parts(tiny_artifact):
    source = tiny_artifact("q4f32_1")
    return Plan.load(source / "plan.json"), executor(source, "llvm"), tiny_artifact


def test_a_split_run_moves_buffers_and_matches_the_source(split_parts):
    plan, source, tiny_artifact = split_parts
    target = executor(tiny_artifact("q4f32_1", "webgpu"), "webgpu")
    split = SplitRun(plan, source, target)
    runs = schedule(PROMPT, SCENARIO, CausalLM(plan))
    reference, tokens = forward(split, runs, frozenset())
    assert split.moves == 0
    order = kernel_order(plan, "plan")
    for chosen in (order[::2], order[1::3], order):  # neighbours on alternating sides
        got, _ = forward(split, runs, frozenset(chosen), tokens)
        assert max(offload.divergence(got, reference)) < 1e-4
    assert split.moves > 0 and split.moved_bytes > 0


def test_kind_order_groups_kernels_by_what_their_blocks_do(split_parts):
    plan = split_parts[0]
    order = kernel_order(plan, "kind")
    assert sorted(order) == sorted(plan.kernels)
    kinds = [plan.kernel_kinds[k] for k in order]
    assert kinds == sorted(kinds, key=KERNEL_KINDS.index)
    assert plan.kernel_kinds["dequantize_take"] == "lookup"
    assert plan.kernel_kinds["rms_norm"] == "reduction"
    assert plan.kernel_kinds["attention"] == "opaque"
    assert plan.kernel_kinds["silu_multiply"] == "elementwise"
    assert order.index("rms_norm") < order.index("rope_kv_write") < order.index("attention")
    assert order[-1].startswith(("dequantize_matmul", "fused_dequantize_matmul"))


@pytest.mark.parametrize("bad", ["rope_kv_write", "rope_kv_write1"])  # decode and prefill
def test_bisection_names_the_planted_kernel_within_the_bound(split_parts, tmp_path, bad):
    plan, source, tiny_artifact = split_parts
    broken = broken_copy(tiny_artifact("q4f32_1", "webgpu"), bad, tmp_path / "broken")
    split = SplitRun(plan, source, executor(broken, "webgpu"))
    order = kernel_order(plan, "plan")
    runs = schedule(PROMPT, SCENARIO, CausalLM(plan))
    result = Offloader(split, runs, order, 2e-3).offload()
    assert result.culprit == bad and not result.migrated
    assert result.runs <= math.ceil(math.log2(len(order))) + 2
    diverged = [e.offloaded for e in result.evaluations if not e.ok]
    assert min(diverged) == order.index(bad) + 1  # the first prefix holding it diverges


def test_a_rerun_resumes_from_the_recorded_steps(split_parts, tmp_path, monkeypatch):
    plan, source, tiny_artifact = split_parts
    broken = broken_copy(tiny_artifact("q4f32_1", "webgpu"), "rope_kv_write1", tmp_path / "broken")
    split = SplitRun(plan, source, executor(broken, "webgpu"))
    order, runs = kernel_order(plan, "plan"), schedule(PROMPT, SCENARIO, CausalLM(plan))
    state = tmp_path / "state.json"
    first = Offloader(split, runs, order, 2e-3, state, "key").offload()
    evaluated = []
    real_forward = offload.forward

    def counting(split, runs, offloaded, tokens=None):
        evaluated.append(len(offloaded))
        return real_forward(split, runs, offloaded, tokens)

    monkeypatch.setattr(offload, "forward", counting)
    again = Offloader(split, runs, order, 2e-3, state, "key").offload()
    assert evaluated == [0]  # only the all-source reference runs again
    assert again.culprit == first.culprit and again.resumed == len(first.evaluations)
    evaluated.clear()
    Offloader(split, runs, order, 2e-3, state, "other kernels").offload()
    assert len(evaluated) == first.runs  # recorded steps of other settings are not reused


# -- the real model, through a device agent ---------------------------------------------------
@pytest.mark.real_model
def test_a_broken_kernel_of_smollm2_is_localized_over_the_agent(tmp_path):
    from tapml.carving.scenarios import SCENARIOS
    from tapml.carving.workflow import artifacts, offload_model
    from tapml.targets.remote import start_local_agent

    source_dir, target_dir = artifacts("smollm2-135m", "webgpu", None)
    broken = broken_copy(target_dir, "rope_kv_write1", tmp_path / "broken")
    kernels = len(Plan.load(source_dir / "plan.json").kernels)
    with start_local_agent("wgpu") as url:  # the broken WGSL goes through the normal load
        report = offload_model("smollm2-135m", "webgpu", url, SCENARIOS["chat"],
                               tmp_path / "offload", bundle=broken, progress=False)  # fmt: skip
    assert report["culprit"] == "rope_kv_write1" and not report["migrated"]
    assert report["runs"] <= report["run_bound"] == math.ceil(math.log2(kernels)) + 2
    check = report["cross_check"]
    assert check["kernel"] == "rope_kv_write1"
    assert check["calls"] > 0 and check["failed"] == check["calls"]
    assert np.isfinite([s["divergence"] for s in report["steps"]]).all()
