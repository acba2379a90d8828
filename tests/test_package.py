"""Bundles (`tapml package`, `tapml verify`, `tapml run --bundle`): layout and manifest,
checksums that catch a damaged file by name, atomic replacement, and bundles that run with
their target's executor like the artifact they came from."""

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROMPT, PROMPT_IDS, TINY_CHUNK, TINY_CONTEXT, greedy_trace

from tapml.cli import main
from tapml.errors import BundleError, ExecutorError
from tapml.package import (
    MANIFEST,
    chat_format,
    package,
    read_manifest,
    render_chat,
    runtime_web_dir,
    verify,
)
from tapml.plan import Plan
from tapml.runtime.engine import Engine
from tapml.targets import TARGETS
from tapml.targets.records import load_records
from tapml.tokenizer import Tokenizer

TINY_IDS = list(range(100, 111))


@pytest.fixture(scope="module")
def bundles(tiny_artifact, tmp_path_factory):
    """bundles(platform, quantization) -> a tiny model's bundle, packaged once per module."""
    made = {}
    targets = {"webgpu": "webgpu", "android": "opencl"}

    def get(platform: str, quantization: str = "q4f32_1"):
        if (platform, quantization) not in made:
            artifact = tiny_artifact(quantization, targets[platform])
            out = tmp_path_factory.mktemp("bundles") / f"{platform}-{quantization}"
            made[platform, quantization] = package(str(artifact), platform, out, progress=False)
        return made[platform, quantization].path

    return get


def copy_of(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle, tmp_path / "copy")


def test_web_bundle_is_an_artifact_plus_manifest_runtime_and_page(bundles, tiny_artifact):
    bundle = bundles("webgpu")
    manifest = read_manifest(bundle)
    assert (manifest["format"], manifest["version"]) == ("tapml-bundle", 2)
    assert (manifest["platform"], manifest["target"], manifest["quantization"]) == (
        "webgpu", "webgpu", "q4f32_1")  # fmt: skip
    assert manifest["task"] == {"kind": "causal_lm", "max_context": TINY_CONTEXT,
                                "chunk": TINY_CHUNK}  # fmt: skip
    assert (bundle / "index.html").read_bytes() == (runtime_web_dir() / "index.html").read_bytes()
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert files - {MANIFEST} == {f["path"] for f in manifest["files"]}
    for f in manifest["files"]:
        data = (bundle / f["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["nbytes"], f["sha256"])
    artifact = tiny_artifact("q4f32_1", "webgpu")
    for name in ("tapml-config.json", "plan.json", "kernels_webgpu.json", "weights/index.json",
                 "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):  # fmt: skip
        assert (bundle / name).read_bytes() == (artifact / name).read_bytes(), name
    for name in ("index.html", "runtime/engine.js", "runtime/executor.js", "runtime/chat.js",
                 "runtime/vendor/web-tokenizers.js", "runtime/vendor/web-xgrammar.js"):  # fmt: skip
        assert name in files
    assert {p["name"] for p in manifest["third_party"]} == {
        "@mlc-ai/web-tokenizers", "@mlc-ai/web-xgrammar"}  # fmt: skip
    assert verify(bundle) == []


def test_web_requirements_are_what_the_wgpu_executor_requests(bundles):
    from tapml.targets.webgpu import required_limits

    bundle = bundles("webgpu")
    plan = Plan.load(bundle / "plan.json")
    wanted = required_limits(plan, load_records(bundle / "kernels_webgpu.json"),
                             TARGETS["webgpu"])  # fmt: skip
    requirements = read_manifest(bundle)["requirements"]
    assert requirements["limits"]["maxStorageBufferBindingSize"] == wanted[
        "max-storage-buffer-binding-size"]  # fmt: skip
    assert len(requirements["limits"]) == len(wanted)
    assert requirements["limits"]["maxComputeInvocationsPerWorkgroup"] == 256
    assert requirements["features"] == []
    assert requirements["memory_bytes"] > plan.nbytes("embed_tokens.q_weight")


def test_android_bundle_has_opencl_kernels_and_requirements(bundles):
    bundle = bundles("android")
    manifest = read_manifest(bundle)
    assert (manifest["platform"], manifest["target"]) == ("android", "opencl")
    files = {f["path"] for f in manifest["files"]}
    assert "kernels_opencl.json" in files and not any(f.startswith("runtime/") for f in files)
    requirements = manifest["requirements"]
    assert requirements["api"] == "opencl" and requirements["extensions"] == []
    assert 0 < requirements["CL_DEVICE_MAX_WORK_GROUP_SIZE"] <= 256


@pytest.mark.parametrize("platform", ["webgpu", "android"])
def test_bundle_runs_like_its_artifact(bundles, tiny_artifact, platform):
    from tapml.targets import executes_here

    target = {"webgpu": "webgpu", "android": "opencl"}[platform]
    ok, why = executes_here(TARGETS[target])
    if not ok:
        pytest.skip(f"{target} does not execute here: {why}")
    got = greedy_trace(Engine(bundles(platform)), TINY_IDS, 3)
    want = greedy_trace(Engine(tiny_artifact("q4f32_1", target)), TINY_IDS, 3)
    assert got[1] == want[1]
    for a, b in zip(got[0], want[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_run_bundle_cli_prints_the_artifacts_completion(bundles, tiny_artifact):
    runner = CliRunner()
    args = ["-q", "run", "--prompt", PROMPT, "--max-tokens", "4"]
    from_bundle = runner.invoke(main, [*args, "--bundle", str(bundles("android"))])
    assert from_bundle.exit_code == 0, from_bundle.output
    from_artifact = runner.invoke(main, [*args, str(tiny_artifact("q4f32_1", "opencl"))])
    assert from_bundle.stdout == from_artifact.stdout and from_bundle.stdout.strip()
    both = runner.invoke(main, [*args, "x", "--bundle", str(bundles("android"))])
    assert both.exit_code == 2 and "either MODEL or --bundle" in both.output


def test_run_bundle_refuses_a_plain_directory(tiny_artifact):
    result = CliRunner().invoke(main, ["run", "--bundle", str(tiny_artifact("q4f32_1", "opencl")),
                                       "-p", "x"])  # fmt: skip
    assert result.exit_code == 1 and "not a tapml bundle" in result.output


def test_verify_cli_passes_an_intact_bundle(bundles):
    result = CliRunner().invoke(main, ["-q", "verify", str(bundles("webgpu"))])
    assert result.exit_code == 0 and "all intact" in result.output


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_verify_names_a_damaged_shard(bundles, tmp_path, damage):
    bundle = copy_of(bundles("android"), tmp_path)
    shard = bundle / "weights" / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(data)
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.unlink()
    result = CliRunner().invoke(main, ["-q", "verify", str(bundle)])
    assert result.exit_code == 1
    why = {"corrupt": "fails its sha256 check", "truncate": "truncated", "delete": "missing"}
    assert "weights/params_shard_0.bin: " in result.output and why[damage] in result.output
    assert "package the model again" in result.output


def test_verify_refuses_a_bad_manifest(bundles, tmp_path):
    bundle = copy_of(bundles("android"), tmp_path)
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    result = CliRunner().invoke(main, ["verify", str(bundle)])
    assert result.exit_code == 1 and "version 99" in result.output
    (bundle / MANIFEST).unlink()
    (bundle / "tapml-config.json").unlink()  # else it is checked as the compiled model it holds
    result = CliRunner().invoke(main, ["verify", str(bundle)])
    assert result.exit_code == 1 and "no bundle.json" in result.output


def test_package_replaces_a_bundle_and_refuses_other_directories(bundles, tiny_artifact, tmp_path):
    artifact = str(tiny_artifact("q4f32_1", "opencl"))
    out = tmp_path / "bundle"
    package(artifact, "android", out, progress=False)
    (out / "stale.txt").write_text("from an older bundle")
    package(artifact, "android", out, progress=False)
    assert not (out / "stale.txt").exists() and verify(out) == []
    assert not (tmp_path / "bundle.partial").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(BundleError, match="is not a bundle"):
        package(artifact, "android", other, progress=False)
    assert (other / "mine.txt").read_text() == "keep me"


def test_package_refuses_an_artifact_of_another_target(tiny_artifact, tmp_path):
    with pytest.raises(BundleError, match="needs opencl kernels"):
        package(str(tiny_artifact("q4f32_1", "webgpu")), "android", tmp_path / "b", progress=False)


def test_package_cli(tiny_artifact, tmp_path):
    out = tmp_path / "cli-bundle"
    result = CliRunner().invoke(main, ["-q", "package", str(tiny_artifact("q4f32_1", "opencl")),
                                       "--target", "android", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and verify(out) == []
    bad = CliRunner().invoke(main, ["package", "x", "--target", "ios", "-o", str(out)])
    assert bad.exit_code == 2 and "webgpu" in bad.output


def test_f16_android_bundle_packages_but_pocl_cannot_run_it(bundles):
    bundle = bundles("android", "q4f16_1")
    requirements = read_manifest(bundle)["requirements"]
    assert requirements["extensions"] == ["cl_khr_fp16"]
    assert verify(bundle) == []
    from tapml.targets.opencl import has_fp16, pick_device

    try:
        _, device = pick_device()
    except ExecutorError as e:
        pytest.skip(str(e))
    if has_fp16(device):
        pytest.skip("this OpenCL device has fp16")
    with pytest.raises(ExecutorError, match="no fp16"):
        Engine(bundle)


def test_chat_format_renders_like_the_template(tiny_artifact):
    tokenizer = Tokenizer.load(tiny_artifact("q4f32_1", "opencl") / "tokenizer")
    chat = chat_format(tokenizer)
    assert chat is not None
    talks = [
        [{"role": "user", "content": "Name a {river}."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    ]  # fmt: skip
    for messages in talks:
        assert render_chat(chat, messages) == tokenizer.apply_chat_template(messages)


def test_chat_format_is_none_for_a_template_it_cannot_express(tiny_artifact):
    tokenizer = Tokenizer.load(tiny_artifact("q4f32_1", "opencl") / "tokenizer")
    # the turn text depends on its position: no fixed before/after strings express it
    tokenizer._config["chat_template"] = (
        "{% for m in messages %}[{{ loop.index }}] {{ m['content'] }}\n{% endfor %}"
    )
    assert chat_format(tokenizer) is None



@pytest.mark.real_model
def test_smollm2_android_bundle_runs_on_opencl_like_the_cpu(real_artifact, tmp_path):
    from tapml.targets import executes_here

    ok, why = executes_here(TARGETS["opencl"])
    if not ok:
        pytest.skip(f"opencl does not execute here: {why}")
    bundle = package("smollm2-135m", "android", tmp_path / "android", progress=False)
    assert verify(bundle.path) == []
    got = list(Engine(bundle.path).generate_ids(PROMPT_IDS, max_tokens=4))
    want = list(Engine(real_artifact("gguf")).generate_ids(PROMPT_IDS, max_tokens=4))
    assert got == want
