"""Carving and replay: which calls a carve keeps, the suite format and its errors, resuming,
bit-exact replay on the source, and replay on webgpu and opencl that names a broken kernel.

The tiny random model proves the mechanics fast; the real SmolLM2 suite (marked real_model)
is the evidence that every kernel of the real model passes on webgpu and opencl.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from broken_kernel import shift_position
from click.testing import CliRunner

from tapml.carving import carve as carving
from tapml.carving.replay import compare, matches
from tapml.carving.runs import schedule
from tapml.carving.scenarios import Scenario, select
from tapml.carving.suite import ArrayStore, Suite
from tapml.cli import main
from tapml.errors import SuiteError, TapmlError
from tapml.plan import CausalLM, Plan

TINY_SCENARIOS = (Scenario("short", "a short prompt", "The capital of France is", chat=False),
                  Scenario("chat", "a chat prompt", "Hi!", decode_steps=4))  # fmt: skip


@pytest.fixture(scope="session")
def tiny_suite(tiny_artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite") / "tiny"
    carving.carve(tiny_artifact("q4f32_1"), out, list(TINY_SCENARIOS), "tiny", progress=False)
    return out


def tapml_test(args: list[str]) -> tuple[int, str, dict]:
    """`tapml -q test ARGS` -> exit code, output and the report it wrote."""
    result = CliRunner().invoke(main, ["-q", "test", *args])
    suite = Path(args[0])
    reports = sorted((suite / "reports").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    return result.exit_code, result.output, json.loads(reports[-1].read_text()) if reports else {}




# -- choosing calls --------------------------------------------------------------------------
def test_choose_covers_first_chunk_padded_chunk_and_late_decode_step(tiny_artifact):
    task = CausalLM(Plan.load(tiny_artifact("q4f32_1") / "plan.json"))
    prompt = list(range(20))  # chunks of 8: 8, 8 and a padded 4
    plan_runs = schedule(prompt, Scenario("s", "", "", chat=False, decode_steps=6), task)
    events = [carving.Event(r.step, r.function, 0, "k", tuple(sorted(r.scalars.items())), 0)
              for r in plan_runs if r.function == "prefill"]  # fmt: skip
    chosen = carving.choose(events, 2)
    assert [e.step for e in chosen] == [0, 2]  # the first chunk, then the padded last one
    decode = [carving.Event(r.step, r.function, 0, "k", (("pos", r.scalars["pos"]),), layer)
              for r in plan_runs if r.function == "decode" for layer in range(3)]  # fmt: skip
    chosen = carving.choose(decode, 3)
    assert (chosen[0].step, chosen[0].layer) == (3, 0)  # the first decode step, first layer
    assert (chosen[1].step, chosen[1].layer) == (8, 2)  # the last step, another layer
    assert len({e.layer for e in chosen}) == 3 and len({e.step for e in chosen}) == 3


def test_select_keeps_at_most_the_limit_per_kernel(tiny_artifact):
    plan = Plan.load(tiny_artifact("q4f32_1") / "plan.json")
    runs = schedule(list(range(13)), Scenario("s", "", "", decode_steps=3), CausalLM(plan))
    keep, counts = carving.select(plan, runs, 2)
    kept: dict[str, int] = {}
    for step, index in keep:
        kernel = plan.functions[runs[step].function]["calls"][index]["kernel"]
        kept[kernel] = kept.get(kernel, 0) + 1
    assert set(kept) == set(plan.kernels) == set(counts)
    assert all(1 <= n <= 2 for n in kept.values())
    assert sum(counts.values()) == sum(len(plan.functions[r.function]["calls"]) for r in runs)


def test_scenarios_cover_chat_long_json_and_multilingual():
    names = [s.name for s in select()]
    assert names == ["chat", "long", "json", "multilingual"]
    assert [s.prompt for s in select((), ("mine",))] == ["mine"]
    with pytest.raises(TapmlError, match="unknown scenario 'nope'"):
        select(("nope",))


def test_a_chat_scenario_is_plain_text_for_a_model_without_a_chat_template(tiny_artifact):
    from tapml.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_artifact("q4f32_1") / "tokenizer")
    chat = Scenario("chat", "a chat prompt", "Hi!")
    assert chat.chats(tokenizer) and chat.prompt_ids(tokenizer) != tokenizer.encode("Hi!")
    tokenizer._config["chat_template"] = None  # a base model's (Gemma-3-270M)
    assert not chat.chats(tokenizer) and chat.prompt_ids(tokenizer) == tokenizer.encode("Hi!")


def test_carving_on_a_source_that_cannot_execute_here_fails_before_compiling(tmp_path):
    from tapml.targets import TARGETS, executes_here

    if executes_here(TARGETS["cuda"])[0]:
        pytest.skip("this machine runs cuda")
    result = CliRunner().invoke(main, ["carve", "smollm2-135m", "--source", "cuda", "-o",
                                       str(tmp_path / "suite")])  # fmt: skip
    assert result.exit_code == 1 and "cannot carve on cuda here" in result.output
    assert not (tmp_path / "suite").exists()


def test_carve_compiles_its_source_with_the_kv_cache_every_target_holds(tiny_gguf, tmp_path,
                                                                         monkeypatch):
    # llvm's own default is a float16 cache; a suite must replay on webgpu's float32 one
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "cache"))
    suite = tmp_path / "suite"
    args = ["-q", "carve", str(tiny_gguf), "--prompt", "Hi!", "--max-calls-per-kernel", "1"]
    result = CliRunner().invoke(main, [*args, "-o", str(suite)])
    assert result.exit_code == 0, result.output
    assert Suite.load(suite).manifest["options"]["kv_cache"] == "float32"
    code, output, report = tapml_test([str(suite), "--target", "webgpu"])
    assert code == 0 and report["passed"], output


def test_matches_is_substring_or_glob():
    assert matches("attn", "attention") is False and matches("atten", "attention")
    assert matches("rope?", "rope1") and not matches("rope?", "rope")


def test_compare_tolerances_and_nonfinite():
    want = np.array([1.0, -2.0, 100.0], "float32")
    tol = {"rtol": 1e-3, "atol": 1e-4}
    assert compare(want + 1e-3, want, tol)[0]
    assert not compare(want + np.array([0, 0, 1.0], "float32"), want, tol)[0]
    assert not compare(np.array([1.0, np.nan, 100.0], "float32"), want, tol)[0]
    assert not compare(np.array([1.0, np.inf, 100.0], "float32"), want, tol)[0]
    assert compare(np.array([3, 4]), np.array([3, 4]), tol) == (True, 0.0, 0.0)
    assert not compare(np.array([3, 5]), np.array([3, 4]), tol)[0]


# -- the suite format ------------------------------------------------------------------------
def test_suite_stores_each_array_once(tiny_suite):
    suite = Suite.load(tiny_suite)
    digests = {a["before"] for c in suite.calls for a in c["args"] if "before" in a}
    uses = sum("before" in a for c in suite.calls for a in c["args"])
    assert len(digests) < uses  # weights and shared inputs are stored once
    assert len(list((tiny_suite / "arrays").rglob("*.z"))) >= len(digests)
    m = suite.manifest
    assert m["format"] == "tapml-suite" and m["version"] == 1 and m["source"] == "llvm"
    for kernel, counts in m["kernels"].items():
        assert 1 <= counts["kept"] <= min(counts["calls"], 3 * len(TINY_SCENARIOS)), kernel
    written = [a for c in suite.calls for a in c["args"] if a.get("output")]
    assert written and all("after" in a and a["tolerance"] for a in written)


def test_resume_carves_only_the_unfinished_scenario(tiny_artifact, tiny_suite, tmp_path,
                                                    monkeypatch):  # fmt: skip
    carved: list[str] = []
    original = carving.Carver.scenario

    def interrupted(self, scenario, progress=None):
        if carved:
            raise KeyboardInterrupt
        carved.append(scenario.name)
        return original(self, scenario, progress)

    monkeypatch.setattr(carving.Carver, "scenario", interrupted)
    with pytest.raises(KeyboardInterrupt):
        carving.carve(tiny_artifact("q4f32_1"), tmp_path, list(TINY_SCENARIOS), "tiny",
                      progress=False)  # fmt: skip
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(SuiteError, match="interrupted"):
        Suite.load(tmp_path)

    def counting(self, scenario, progress=None):
        carved.append(scenario.name)
        return original(self, scenario, progress)

    monkeypatch.setattr(carving.Carver, "scenario", counting)
    resumed = carving.carve(tiny_artifact("q4f32_1"), tmp_path, list(TINY_SCENARIOS), "tiny",
                            progress=False)  # fmt: skip
    assert carved == ["short", "chat"]  # the second run carved only what the first did not
    fresh = Suite.load(tiny_suite)
    assert [c["id"] for c in resumed.calls] == [c["id"] for c in fresh.calls]
    for call in resumed.calls + fresh.calls:
        call.pop("source_seconds")
    assert resumed.calls == fresh.calls  # the same calls, bit for bit (content hashes)


def test_carving_into_a_suite_of_other_settings_is_refused(tiny_artifact, tiny_suite):
    with pytest.raises(SuiteError, match="other settings .*max_calls_per_kernel"):
        carving.carve(tiny_artifact("q4f32_1"), tiny_suite, list(TINY_SCENARIOS), "tiny",
                      max_calls=5, progress=False)  # fmt: skip


def test_corrupt_and_truncated_suite_files_are_named(tiny_suite, tiny_artifact, tmp_path):
    bundle = str(tiny_artifact("q4f32_1"))
    broken = tmp_path / "suite"
    shutil.copytree(tiny_suite, broken)
    array = next((broken / "arrays").rglob("*.z"))
    array.write_bytes(array.read_bytes()[:-7])
    code, output, _ = tapml_test([str(broken), "--bundle", bundle])
    assert code == 1 and array.name in output and "corrupt" in output
    (broken / "manifest.json").write_text('{"format": "tapml-suite", "vers')
    code, output, _ = tapml_test([str(broken), "--bundle", bundle])
    assert code == 1 and "manifest.json is corrupt" in output
    with pytest.raises(SuiteError, match="fails its checksum"):
        store = ArrayStore(tmp_path / "store")
        digest = store.put(np.arange(4, dtype="int32"))
        store.path(digest).write_bytes(__import__("zlib").compress(b"\0" * 16))
        store.get(digest, "int32", [4])


# -- replay ----------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["llvm", "webgpu", "opencl"])
def test_tiny_suite_passes_on_every_executing_target(tiny_suite, tiny_artifact, target):
    code, output, report = tapml_test([str(tiny_suite), "--bundle",
                                      str(tiny_artifact("q4f32_1", target))])  # fmt: skip
    assert code == 0, output
    assert report["target"] == target and report["passed"]
    assert report["exact"] == (target == "llvm")  # the source must replay bit-exactly
    assert len(report["calls"]) == len(Suite.load(tiny_suite).calls)
    if target == "llvm":
        assert all(c["max_abs"] == 0 for c in report["calls"])


def test_pattern_selects_kernels_and_unknown_ones_are_an_error(tiny_suite, tiny_artifact):
    code, output, report = tapml_test([str(tiny_suite), "--target", "llvm", "--bundle",
                                      str(tiny_artifact("q4f32_1")), "-k", "rope*"])  # fmt: skip
    assert code == 0 and {k["kernel"][:4] for k in report["kernels"]} == {"rope"}
    code, output, _ = tapml_test([str(tiny_suite), "--bundle", str(tiny_artifact("q4f32_1")),
                                 "-k", "no_such_kernel"])  # fmt: skip
    assert code == 1 and "no kernel" in output


def break_kernel(artifact: Path, kernel: str, out: Path) -> Path:
    """A copy of a webgpu artifact's kernels with an off-by-one position in `kernel`."""
    out.mkdir()
    for name in ("tapml-config.json", "plan.json", "kernels_webgpu.json"):
        shutil.copy(artifact / name, out / name)
    shift_position(out, kernel)
    return out


def test_a_broken_kernel_is_named_and_no_other(tiny_suite, tiny_artifact, tmp_path):
    broken = break_kernel(tiny_artifact("q4f32_1", "webgpu"), "rope_kv_write", tmp_path / "broken")
    code, output, report = tapml_test([str(tiny_suite), "--bundle", str(broken)])
    assert code == 1
    assert [k["kernel"] for k in report["kernels"] if k["status"] != "pass"] == ["rope_kv_write"]
    assert "failing kernels: rope_kv_write\n" in output


# -- the real model --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_suite(real_artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite") / "smollm2"
    carving.carve(real_artifact("gguf"), out, select(), "smollm2-135m", progress=False)
    return out


@pytest.mark.real_model
@pytest.mark.parametrize("target", ["llvm", "webgpu", "opencl"])
def test_real_suite_passes_on_webgpu_and_opencl_and_replays_exactly_on_llvm(
    real_suite, real_artifact, target
):
    code, output, report = tapml_test([str(real_suite), "--target", target])
    assert code == 0, output
    suite = Suite.load(real_suite)
    assert len(report["calls"]) == len(suite.calls) and report["passed"]
    assert {k["kernel"] for k in report["kernels"]} == set(suite.manifest["kernels"])
    plan = Plan.load(real_artifact("gguf") / "plan.json")
    assert set(suite.manifest["kernels"]) == set(plan.kernels)  # every distinct kernel
    assert (report["suite"]["scenarios"] == ["chat", "long", "json", "multilingual"])
    assert (Path(real_suite) / "reports" / target / "report.html").is_file()


@pytest.mark.real_model
def test_real_suite_names_a_broken_rope_kernel_on_webgpu(real_suite, tmp_path):
    from tapml.api import ensure_compiled

    artifact = ensure_compiled("smollm2-135m", "webgpu")
    broken = break_kernel(artifact, "rope_kv_write", tmp_path / "broken")
    code, output, report = tapml_test([str(real_suite), "--bundle", str(broken)])
    assert code == 1
    assert [k["kernel"] for k in report["kernels"] if k["status"] != "pass"] == ["rope_kv_write"]


def test_a_suite_replays_on_a_remote_device_agent(tiny_suite, tiny_artifact, monkeypatch):
    from tapml.targets.remote import start_local_agent

    with start_local_agent("opencl") as url:
        monkeypatch.setenv("TAPML_DEVICE_TOKEN", url.token)
        code, output, report = tapml_test([str(tiny_suite), "--device", str(url), "--bundle",
                                           str(tiny_artifact("q4f32_1", "opencl"))])  # fmt: skip
    assert code == 0, output
    assert report["passed"] and report["device"].endswith(f"at {url}")
    assert len(report["calls"]) == len(Suite.load(tiny_suite).calls)


def test_a_suite_replays_on_an_android_bundles_kernels(tiny_suite, tiny_artifact, tmp_path):
    from tapml.package import package

    bundle = package(str(tiny_artifact("q4f32_1", "opencl")), "android", tmp_path / "android",
                     progress=False).path  # fmt: skip
    code, output, report = tapml_test([str(tiny_suite), "--bundle", str(bundle)])
    assert code == 0, output
    assert report["target"] == "opencl" and report["passed"]


def test_a_suite_replays_bit_exactly_on_a_tvm_rpc_server(tiny_suite, tiny_artifact):
    from test_tvm_rpc import free_port, start, stop, wait_listening

    port = free_port()
    server = start("rpc_server", "--port", str(port), "--port-end", str(port + 1))
    try:
        wait_listening(port)
        code, output, report = tapml_test([str(tiny_suite), "--device",
                                           f"tvm-rpc://127.0.0.1:{port}", "--bundle",
                                           str(tiny_artifact("q4f32_1"))])  # fmt: skip
    finally:
        stop(server)
    assert code == 0, output
    assert report["exact"] and report["passed"]  # llvm kernels, as carved: bit for bit
    assert all(c["max_abs"] == 0 for c in report["calls"])
