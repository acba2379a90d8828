"""TVM RPC devices: `python -m tvm.exec.rpc_server` on loopback runs the llvm kernel library,
reached directly (tvm-rpc://) and through `python -m tvm.exec.rpc_tracker` with a key
(tvm-tracker://); runs equal the local llvm executor's, and a dead server is DeviceLost."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_device_agent import CHUNK_IDS, load, trace

from tapml.errors import DeviceError, DeviceLost
from tapml.targets import load_executor
from tapml.targets.remote import open_executor

KEY = "tapml-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(module: str, *args: str) -> subprocess.Popen:
    # a session of its own: rpc_server forks a child per client, which must die with it
    return subprocess.Popen([sys.executable, "-m", f"tvm.exec.{module}", "--host", "127.0.0.1",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_listening(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port} after {timeout} s")


def wait_registered(tracker_port: int, key: str, timeout: float = 60) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if key in rpc.connect_tracker("127.0.0.1", tracker_port).summary()["queue_info"]:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no server of key {key} registered with the tracker after {timeout} s")


@pytest.fixture
def rpc_server():
    port = free_port()
    process = start("rpc_server", "--port", str(port), "--port-end", str(port + 1))
    try:
        wait_listening(port)
        yield process, f"tvm-rpc://127.0.0.1:{port}"
    finally:
        stop(process)


def assert_same_run(url, artifact) -> None:
    plan, params = load(artifact)
    local = load_executor("llvm", plan, artifact)
    local.load_params(params)
    with open_executor(url, "llvm", plan, artifact) as remote:
        remote.load_params(params)
        chunk = plan.model["chunk"]
        got, want = trace(remote, chunk, CHUNK_IDS, 2), trace(local, chunk, CHUNK_IDS, 2)
        for step, (a, b) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
        assert remote.time_call("decode", 0, {"pos": 3}) > 0


def test_llvm_kernels_on_an_rpc_server_equal_the_local_run(rpc_server, tiny_artifact):
    assert_same_run(rpc_server[1], tiny_artifact("q4f32_1", "llvm"))


def test_llvm_kernels_through_a_tracker_equal_the_local_run(tiny_artifact):
    tracker_port, server_port = free_port(), free_port()
    tracker = start("rpc_tracker", "--port", str(tracker_port), "--port-end",
                    str(tracker_port + 1))  # fmt: skip
    server = None
    try:
        wait_listening(tracker_port)
        server = start("rpc_server", "--port", str(server_port), "--port-end",
                       str(server_port + 1), "--tracker", f"127.0.0.1:{tracker_port}",
                       "--key", KEY)  # fmt: skip
        wait_registered(tracker_port, KEY)
        assert_same_run(f"tvm-tracker://127.0.0.1:{tracker_port}/{KEY}",
                        tiny_artifact("q4f32_1", "llvm"))  # fmt: skip
        # a key no server registered: the tracker would queue the request forever
        plan = load(tiny_artifact("q4f32_1", "llvm"))[0]
        with pytest.raises(DeviceLost, match="no TVM RPC session within 2 s"):
            open_executor(f"tvm-tracker://127.0.0.1:{tracker_port}/no-such-key", "llvm", plan,
                          tiny_artifact("q4f32_1", "llvm"), timeout=2)  # fmt: skip
    finally:
        if server is not None:
            stop(server)
        stop(tracker)


def test_killed_rpc_server_is_device_lost(rpc_server, tiny_artifact):
    process, url = rpc_server
    artifact = tiny_artifact("q4f32_1", "llvm")
    plan, params = load(artifact)
    executor = open_executor(url, "llvm", plan, artifact)
    executor.load_params(params)
    stop(process)
    with pytest.raises(DeviceLost, match=f"lost the TVM RPC server at {url} during run"):
        executor.run("decode", {"pos": 0}, {"decode.token": np.array([1], "int32")})
    with pytest.raises(DeviceLost, match="session .* is closed"):
        executor.download("k_cache_0")


def test_rpc_devices_run_llvm_kernels_only(tiny_artifact):
    artifact = tiny_artifact("q4f32_1", "llvm")
    with pytest.raises(DeviceError, match="runs the llvm target's kernel library, not webgpu"):
        open_executor("tvm-rpc://127.0.0.1:9", "webgpu", load(artifact)[0], artifact)
