"""The device agent on loopback, started as `tapml device serve` processes: runs through
open_executor equal the local executors', and every refusal and fault the agent promises
(tokens, oversized transfers, native code, malformed requests, a killed or frozen agent)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROMPT_IDS

from tapml.errors import DeviceError, DeviceLost, ExecutorError, PlanError
from tapml.plan import Plan
from tapml.targets import TARGETS, load_executor
from tapml.targets.remote import (
    connect,
    device_info,
    open_executor,
    parse_url,
    start_local_agent,
    wire,
)
from tapml.targets.remote.client import stop_process
from tapml.weights import load_shards

CHUNK_IDS = list(range(100, 113))  # 13 tokens: two prefill chunks of 8, the last padded


def _skip_without(backend: str) -> None:
    from tapml.targets import executes_here

    target = {"wgpu": "webgpu", "opencl": "opencl"}[backend]
    ok, why = executes_here(TARGETS[target])
    if not ok:
        pytest.skip(f"no {backend} device here: {why}")


@pytest.fixture(scope="module")
def wgpu_agent():
    _skip_without("wgpu")
    with start_local_agent("wgpu") as url:
        yield url


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch):
    monkeypatch.delenv(wire.TOKEN_ENV, raising=False)


def load(artifact):
    return Plan.load(artifact / "plan.json"), load_shards(artifact / "weights")


def trace(executor, chunk: int, ids: list[int], steps: int) -> list[np.ndarray]:
    """Logits of a chunked prefill of `ids` then `steps` decodes of fixed tokens."""
    executor.reset_state()
    out, pos = [], 0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        tokens = np.zeros(chunk, "int32")
        tokens[: len(part)] = part
        out.append(executor.run("prefill", {"pos": pos, "n_valid": len(part)},
                                {"prefill.tokens": tokens}))  # fmt: skip
        pos += len(part)
    for step in range(steps):
        token = np.array([7 + step], "int32")
        out.append(executor.run("decode", {"pos": pos}, {"decode.token": token}))
        pos += 1
    return out


def assert_same_run(url, target: str, artifact, ids=CHUNK_IDS, steps: int = 3) -> None:
    plan, params = load(artifact)
    chunk = plan.model["chunk"]
    local = load_executor(target, plan, artifact)
    local.load_params(params)
    with open_executor(url, target, plan, artifact) as remote:
        remote.load_params(params)
        got, want = trace(remote, chunk, ids, steps), trace(local, chunk, ids, steps)
        for step, (a, b) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
        np.testing.assert_array_equal(remote.download("k_cache_0"), local.download("k_cache_0"))


def test_tiny_model_through_the_agent_equals_the_local_run(wgpu_agent, tiny_artifact):
    assert_same_run(wgpu_agent, "webgpu", tiny_artifact("q4f32_1", "webgpu"))


def test_single_calls_run_on_the_device(wgpu_agent, tiny_artifact):
    artifact = tiny_artifact("q4f32_1", "webgpu")
    plan, params = load(artifact)
    calls = plan.functions["decode"]["calls"]
    index, write = next(
        (i, c) for i, c in enumerate(calls) if c["kernel"].startswith("rope_kv_write")
    )
    row, cache = write["args"][0]["buffer"], write["args"][4]["buffer"]  # QKV in, V cache
    b = plan.buffers[row]
    values = np.arange(np.prod(b["shape"]), dtype=b["dtype"]).reshape(b["shape"]) + 1
    kv_heads = plan.buffers[cache]["shape"][0]
    v_row = values[0, -kv_heads:].reshape(-1)  # the V heads come last in QKV, copied as they are
    with open_executor(wgpu_agent, "webgpu", plan, artifact) as remote:
        remote.upload(row, values)
        remote.launch("decode", index, {"pos": 3})
        assert remote.time_call("decode", index, {"pos": 5}) > 0
        rows = remote.download(cache).transpose(1, 0, 2).reshape(plan.model["max_context"], -1)
        np.testing.assert_array_equal(rows[3], v_row)
        np.testing.assert_array_equal(rows[5], v_row)
        assert not rows[4].any()
        remote.reset_state()
        assert not remote.download(cache).any()
        with pytest.raises(PlanError, match="has calls 0..*not 999"):
            remote.launch("decode", 999, {"pos": 0})


def test_opencl_backend_equals_the_local_run(tiny_artifact):
    _skip_without("opencl")
    with start_local_agent("opencl") as url:
        assert_same_run(url, "opencl", tiny_artifact("q4f32_1", "opencl"))


@pytest.mark.real_model
def test_real_smollm2_decode_through_the_agent_equals_the_local_run(wgpu_agent):
    from tapml.api import artifact_for

    artifact = artifact_for("smollm2-135m", "webgpu", progress=False)
    assert_same_run(wgpu_agent, "webgpu", artifact, ids=PROMPT_IDS, steps=2)


# -- refusals ------------------------------------------------------------------------------
def test_missing_and_wrong_tokens_are_refused(wgpu_agent, tiny_artifact):
    artifact = tiny_artifact("q4f32_1", "webgpu")
    plan = Plan.load(artifact / "plan.json")
    bare = str(wgpu_agent)  # the URL without the token start_local_agent attached
    with pytest.raises(DeviceError, match="refused the connection: this agent needs a token"):
        open_executor(bare, "webgpu", plan, artifact)
    with pytest.raises(DeviceError, match="refused the connection: wrong token"):
        open_executor(bare, "webgpu", plan, artifact, token="not-the-token")


def test_oversized_transfers_are_refused(wgpu_agent, tiny_artifact):
    artifact = tiny_artifact("q4f32_1", "webgpu")
    plan = Plan.load(artifact / "plan.json")
    with open_executor(wgpu_agent, "webgpu", plan, artifact) as remote:
        nbytes = plan.nbytes("decode.token")
        with pytest.raises(DeviceError, match=r"refused: an upload of 8 bytes to decode.token, "
                           r"which holds 4"):  # fmt: skip
            remote._call("upload", "decode.token", 0, b"\0" * (nbytes + 4))
        with pytest.raises(DeviceError, match="refused: a kernels of .* at most"):
            remote._call("put", "kernels", 0, b"", 1 << 40)
        with pytest.raises(ExecutorError, match="expected int32"):  # checked before sending
            remote.upload("decode.token", np.zeros(2, "int32"))
        remote.run("decode", {"pos": 0}, {"decode.token": np.array([1], "int32")})  # still up


def test_native_library_needs_trust_native_code(tiny_artifact):
    artifact = tiny_artifact("q4f32_1", "llvm")
    plan = Plan.load(artifact / "plan.json")
    with start_local_agent("llvm") as url:
        with pytest.raises(DeviceError, match="refuses native code.*--trust-native-code"):
            open_executor(url, "llvm", plan, artifact)
    with start_local_agent("llvm", trust_native_code=True) as url:
        assert_same_run(url, "llvm", artifact, steps=1)


def test_malformed_requests_get_errors_and_the_agent_serves_on(wgpu_agent, tiny_artifact):
    artifact = tiny_artifact("q4f32_1", "webgpu")
    plan = Plan.load(artifact / "plan.json")
    token = np.array([3], "int32")
    with open_executor(wgpu_agent, "webgpu", plan, artifact) as good:
        want = good.run("decode", {"pos": 0}, {"decode.token": token})
        conn, _ = connect(parse_url(wgpu_agent), wgpu_agent.token, timeout=30)
        root = conn.root
        with pytest.raises(ValueError, match="malformed request: upload takes"):
            root.upload(["a", "list"], 0, b"")  # a list arrives as a netref: never touched
        with pytest.raises(ValueError, match="no plan is loaded"):
            root.run("decode", "{}", ())
        for private in ("_agent", "exposed_info", "on_disconnect"):  # only the method names
            with pytest.raises(AttributeError, match=f"no method '{private}'"):
                getattr(root, private)
        with pytest.raises(ValueError, match="the plan from .* is not JSON"):
            root.put("plan", 0, b"{nope", 5)
            root.put("kernels", 0, b"", 0)
            root.load("webgpu")
        with pytest.raises(EOFError):  # a frame over the limit: the agent drops this client
            root.put("kernels", 0, b"\0" * (wire.MAX_FRAME + 1), wire.MAX_FRAME + 1)
        np.testing.assert_array_equal(good.run("decode", {"pos": 0}, {"decode.token": token}),
                                      want)  # fmt: skip
    with open_executor(wgpu_agent, "webgpu", plan, artifact) as another:
        another.run("decode", {"pos": 0}, {"decode.token": token})


# -- faults ----------------------------------------------------------------------------------
@pytest.fixture
def own_agent(tmp_path):
    """A `tapml device serve` process of the test's own (to kill), its URL and token."""
    _skip_without("wgpu")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "tapml", "device", "serve", "--backend", "wgpu", "--port", "0",
         "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("tapml://127.0.0.1:"), "the agent did not start"
        yield process, url, "s3cret"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
        stop_process(process)


def test_killed_agent_is_device_lost(own_agent, tiny_artifact):
    process, url, token = own_agent
    artifact = tiny_artifact("q4f32_1", "webgpu")
    plan, params = load(artifact)
    executor = open_executor(url, "webgpu", plan, artifact, token=token, timeout=5)
    executor.load_params(params)
    process.kill()
    start = time.monotonic()
    with pytest.raises(DeviceLost, match=f"lost the device agent at {url}"):
        executor.run("decode", {"pos": 0}, {"decode.token": np.array([1], "int32")})
    assert time.monotonic() - start < 5
    with pytest.raises(DeviceLost, match="was lost earlier"):
        executor.download("k_cache_0")


def test_frozen_agent_is_device_lost_within_the_timeout(own_agent, tiny_artifact):
    process, url, token = own_agent
    artifact = tiny_artifact("q4f32_1", "webgpu")
    plan = Plan.load(artifact / "plan.json")
    executor = open_executor(url, "webgpu", plan, artifact, token=token, timeout=2)
    os.kill(process.pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(DeviceLost, match="did not answer run within 2 s"):
        executor.run("decode", {"pos": 0}, {"decode.token": np.array([1], "int32")})
    assert 1.9 < time.monotonic() - start < 3, "closing after the timeout waited again"
    start = time.monotonic()
    with pytest.raises(DeviceLost, match="did not complete the handshake: timed out"):
        device_info(url, token=token, timeout=2)  # a frozen agent does not even answer hello
    assert time.monotonic() - start < 3


def test_cli_info_and_serve_refusals(own_agent, monkeypatch):
    from tapml.cli import main

    _, url, token = own_agent
    monkeypatch.setenv(wire.TOKEN_ENV, token)
    result = CliRunner().invoke(main, ["device", "info", url])
    assert result.exit_code == 0, result.output
    assert "backend:  wgpu (targets: webgpu, vulkan)" in result.output
    assert "native code refused" in result.output
    monkeypatch.delenv(wire.TOKEN_ENV)
    result = CliRunner().invoke(main, ["device", "serve", "--backend", "wgpu", "--host",
                                       "0.0.0.0"])  # fmt: skip
    assert result.exit_code == 1 and "refusing to serve 0.0.0.0 without a token" in result.output


@pytest.mark.parametrize("url, message", [
    ("http://host:1", "not a device URL"),
    ("tapml://host", "has no HOST:PORT"),
    ("tapml://host:1/key", "has no key"),
    ("tvm-tracker://host:9190", "names the device key"),
])  # fmt: skip
def test_bad_urls_are_explained(url, message):
    with pytest.raises(DeviceError, match=message):
        parse_url(url)


def test_handshake_checks():
    from tapml.targets.remote.server import check_hello

    hello = wire.client_hello("tok").decode().strip()
    assert check_hello(hello, "tok") is None
    assert check_hello(hello, None) is None
    assert check_hello(hello, "other") == "wrong token"
    assert "protocol 9" in check_hello(hello.replace(" 1 ", " 9 "), "tok")
    assert check_hello("GET / HTTP/1.1", None) == "not a tapml device client"
