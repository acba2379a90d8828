"""The device agent under hostile and careless clients: out-of-range requests, frozen and
departed clients, slow handshakes, idle sessions, piles of uploads, signals, generated junk
(hypothesis) and 16 clients at once. Each request gets an answer or an error naming the bad
value; the agent serves on."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import bench_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_device_agent import _skip_without, load

from tapml.errors import DeviceError, DeviceLost, PlanError, TapmlError
from tapml.plan import CausalLM, Plan
from tapml.targets import load_executor
from tapml.targets.remote import device_info, open_executor, start_local_agent, wire

TARGETS = {"llvm": "llvm", "wgpu": "webgpu", "opencl": "opencl"}


@pytest.fixture(scope="module")
def agents():
    """agents(backend) -> the URL of a `tapml device serve` process of that backend, started
    once per module (llvm trusted with native code: it needs a token, which the URL carries)."""
    started, stack = {}, []

    def get(backend: str):
        if backend != "llvm":
            _skip_without(backend)
        if backend not in started:
            context = start_local_agent(backend, trust_native_code=backend == "llvm")
            started[backend] = context.__enter__()
            stack.append(context)
        return started[backend]

    yield get
    for context in reversed(stack):
        context.__exit__(None, None, None)


def session(agents, backend: str, tiny_artifact):
    """An open session on the backend's agent with the tiny model's weights loaded."""
    target = TARGETS[backend]
    artifact = tiny_artifact("q4f32_1", target)
    plan, params = load(artifact)
    executor = open_executor(agents(backend), target, plan, artifact, timeout=30)
    executor.load_params(params)
    return executor


# -- 1: plain values out of the plan's bounds --------------------------------------------------
@pytest.mark.parametrize("backend", ["llvm", "opencl"])
def test_out_of_range_scalars_and_tokens_are_refused_and_the_agent_serves_on(
        agents, backend, tiny_artifact):  # fmt: skip
    with session(agents, backend, tiny_artifact) as remote:
        plan = remote.plan
        lm, limit = CausalLM(plan), plan.task["max_context"]
        want = remote.run(*lm.decode(0, 5))
        refused = [
            (lambda: remote.launch("decode", 0, {"pos": limit}), f"pos < {limit}; got pos={limit}"),
            (lambda: remote.time_call("decode", 3, {"pos": 10**8}), "got pos=100000000"),
            (lambda: remote.launch("prefill", 1, {"pos": limit - 2, "n_valid": 8}),
             rf"pos \+ n_valid <= {limit}"),
            (lambda: remote.run(*lm.decode(10**8, 5)), "got pos=100000000"),
            (lambda: remote.run(*lm.decode(0, 10**8)), r"holds 100000000; its values must lie in"),
            (lambda: remote.run(*lm.decode(0, -1)), r"holds -1; its values must lie in \[0, "),
        ]  # fmt: skip
        for request, message in refused:
            with pytest.raises(PlanError, match=message):
                request()
        # the token check is the agent's own, not only this client's
        token = plan.task["decode"]["tokens"]
        with pytest.raises(PlanError, match="decode.token holds 100000000"):
            remote._call("upload", token, 0, np.array([10**8], "int32").tobytes())
        np.testing.assert_array_equal(remote.run(*lm.decode(0, 5)), want)


def test_local_executors_share_the_agents_bounds(tiny_artifact):
    artifact = tiny_artifact("q4f32_1", "llvm")
    plan, _ = load(artifact)
    local = load_executor("llvm", plan, artifact)
    with pytest.raises(PlanError, match="decode requires pos < 64; got pos=64"):
        local.launch("decode", 0, {"pos": 64})
    with pytest.raises(PlanError, match="decode has calls 0..*not -1"):
        local.time_call("decode", -1, {"pos": 0})
    with pytest.raises(PlanError, match="prefill.tokens holds 49152"):
        local.run(*CausalLM(plan).prefill(0, [1, 49152]))


# -- 2: no unsafe advice -----------------------------------------------------------------------
def test_docs_give_tvms_rpc_server_a_loopback_host_and_a_warning():
    root = Path(__file__).parent.parent
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        for command in re.findall(r"python -m tvm\.exec\.rpc_server[^`\n]*", text):
            assert "--host 127.0.0.1" in command, f"{doc.name}: {command}"
        if "tvm.exec.rpc_server" in text:
            assert "runs any code" in text and "SSH tunnel" in text, doc.name


# -- 3: native code needs a token ----------------------------------------------------------
def test_trust_native_code_without_a_token_is_refused_even_on_loopback(monkeypatch):
    from tapml.cli import main

    monkeypatch.delenv(wire.TOKEN_ENV, raising=False)
    result = CliRunner().invoke(main, ["device", "serve", "--backend", "llvm",
                                       "--trust-native-code", "--port", "0"])  # fmt: skip
    assert result.exit_code == 1
    assert "--trust-native-code needs a token" in result.output


# -- 6: one client cannot hold the agent for everyone -----------------------------------------
@pytest.fixture
def in_process_agent(monkeypatch):
    """in_process_agent(**options) -> (URL with token, Agent): an llvm agent served by threads
    of this process, so that a test can slow its kernels down or read its state."""
    from tapml.targets.remote import DeviceURL
    from tapml.targets.remote.agent import Agent
    from tapml.targets.remote.server import make_server

    servers = []

    def start(**options):
        agent = Agent("llvm", trust_native_code=True, token="t0ken", **options)
        server = make_server(agent, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, agent))
        return DeviceURL(f"tapml://127.0.0.1:{server.server_address[1]}", "t0ken"), agent

    yield start
    for server, agent in servers:
        server.shutdown()
        server.server_close()
        agent.close()


def slow_kernels(monkeypatch, seconds: float) -> None:
    """Every llvm kernel launched in a run takes `seconds` more."""
    from tapml.targets.llvm import TvmRuntimeExecutor

    prepare = TvmRuntimeExecutor._prepare

    def slowed(self, calls):
        prepared, expressions = prepare(self, calls)
        wrapped = [(lambda *a, k=kernel: (time.sleep(seconds), k(*a)), args, slots)
                   for kernel, args, slots in prepared]  # fmt: skip
        return wrapped, expressions

    monkeypatch.setattr(TvmRuntimeExecutor, "_prepare", slowed)


def test_a_departed_clients_run_is_cancelled_and_info_never_waits_for_the_device(
        in_process_agent, tiny_artifact, monkeypatch):  # fmt: skip
    url, agent = in_process_agent()
    artifact = tiny_artifact("q4f32_1", "llvm")
    plan, params = load(artifact)
    slow_kernels(monkeypatch, 0.1)  # a decode of ~40 calls: some 4 s
    leaving = open_executor(url, "llvm", plan, artifact, timeout=30)
    leaving.load_params(params)
    function, scalars, inputs = CausalLM(plan).decode(0, 5)
    leaving._methods["run"](function, json.dumps(scalars),
                            tuple((n, a.tobytes()) for n, a in inputs.items()))  # fmt: skip
    time.sleep(0.5)
    assert agent.lock.locked(), "the run should hold the device"
    start = time.monotonic()
    assert device_info(url, timeout=5)["backend"] == "llvm"
    assert time.monotonic() - start < 1, "info waited for the device lock"
    leaving.close()
    with open_executor(url, "llvm", plan, artifact, timeout=30) as other:
        start = time.monotonic()
        other.reset_state()  # needs the device: free once the departed run stops
        assert time.monotonic() - start < 1.5, "the departed client's run went on"


def test_transfers_in_progress_are_capped_across_sessions(in_process_agent, tiny_artifact):
    url, agent = in_process_agent(max_upload_mb=1)
    artifact = tiny_artifact("q4f32_1", "llvm")
    plan, _ = load(artifact)
    first = open_executor(url, "llvm", plan, artifact, timeout=30)
    second = open_executor(url, "llvm", plan, artifact, timeout=30)
    part = b"\0" * (600 << 10)
    first._call("put", "kernels", 0, part, 1 << 20)  # 600 KiB of a 1 MiB blob, left pending
    with pytest.raises(DeviceError, match=r"holds at most 1 MiB \(--max-upload-mb\)"):
        second._call("put", "kernels", 0, part, 1 << 20)
    first.close()
    deadline = time.monotonic() + 5
    while agent.staging.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second._call("put", "kernels", 0, part, 1 << 20) == len(part)
    second.close()


def test_a_slow_handshake_is_cut_at_its_deadline(in_process_agent, monkeypatch):
    from tapml.targets.remote import server

    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 1.0)
    url, _ = in_process_agent()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.3)
        start, closed = time.monotonic(), None
        for byte in wire.client_hello("t0ken")[:-1]:  # a byte every 0.3 s, never the end
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed = time.monotonic() - start
                    break
            except TimeoutError:
                continue  # still open
            except OSError:
                closed = time.monotonic() - start
                break
        assert closed is not None and 0.9 < closed < 2.0, closed


def test_an_idle_session_is_closed(in_process_agent, tiny_artifact):
    url, _ = in_process_agent(idle_timeout=1.0)
    artifact = tiny_artifact("q4f32_1", "llvm")
    plan, _ = load(artifact)
    with open_executor(url, "llvm", plan, artifact, timeout=30) as executor:
        time.sleep(2.0)
        with pytest.raises(DeviceLost):
            executor.reset_state()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_the_agent_leaves_no_files_behind(tmp_path, tiny_artifact, stop):
    artifact = tiny_artifact("q4f32_1", "llvm")
    plan, _ = load(artifact)
    (tmp_path / "token").write_text("t0ken")
    process = subprocess.Popen(
        [sys.executable, "-m", "tapml", "device", "serve", "--backend", "llvm", "--port", "0",
         "--trust-native-code", "--token-file", str(tmp_path / "token")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    try:
        url = process.stdout.readline().strip()
        with open_executor(url, "llvm", plan, artifact, token="t0ken", timeout=30):
            assert list(tmp_path.glob("tapml-agent-*")), "the agent has a work directory"
            process.send_signal(stop)
            assert process.wait(15) == 0
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert not list(tmp_path.glob("tapml-agent-*"))


# -- the fuzz test ---------------------------------------------------------------------------
def requests(plan: Plan) -> st.SearchStrategy:
    """(method, args) of the agent's request surface: well-typed calls with values from every
    range, and calls of any plain values at all."""
    names = st.sampled_from([*plan.buffers, "nope", ""])
    functions = st.sampled_from([*plan.functions, "nope"])
    ints = st.one_of(st.integers(-3, 80), st.sampled_from([-(2**31), 2**31, 10**8, 2**63 - 1]),
                     st.integers())  # fmt: skip
    scalars = st.one_of(
        st.dictionaries(st.sampled_from(["pos", "n_valid", "x"]), ints).map(json.dumps),
        st.text(max_size=12),
    )  # fmt: skip
    chunks = st.one_of(st.binary(max_size=64), st.integers(0, 4096).map(lambda n: b"\1" * n))
    plain = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=8),
                      st.binary(max_size=16))  # fmt: skip
    typed = st.one_of(
        st.tuples(st.just("info")),
        st.tuples(st.just("put"), st.sampled_from(["plan", "kernels", "x"]), ints, chunks, ints),
        st.tuples(st.just("load"), st.sampled_from(["webgpu", "opencl", "llvm", "cuda", "x"])),
        st.tuples(st.just("upload"), names, ints, chunks),
        st.tuples(st.just("download"), names, ints, ints),
        st.tuples(st.just("run"), functions, scalars,
                  st.lists(st.tuples(names, chunks), max_size=2).map(tuple)),
        st.tuples(st.just("launch"), functions, ints, scalars),
        st.tuples(st.just("time_call"), functions, ints, scalars),
        st.tuples(st.just("reset_state")),
    )  # fmt: skip
    untyped = st.tuples(st.sampled_from(["info", "put", "load", "upload", "download", "run",
                                         "launch", "time_call", "reset_state"]),
                        st.lists(plain, max_size=4))  # fmt: skip
    return st.one_of(typed, untyped.map(lambda m: (m[0], *m[1])))


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip


@pytest.mark.parametrize("backend", ["llvm", "wgpu", "opencl"])
def test_fuzzed_requests_get_answers_or_errors_and_never_end_the_agent(
        agents, backend, tiny_artifact):  # fmt: skip
    remote = session(agents, backend, tiny_artifact)
    fresh = session(agents, backend, tiny_artifact)  # untouched by the fuzz: the reference
    lm = CausalLM(remote.plan)
    want = fresh.run(*lm.decode(0, 5))

    @FUZZ
    @given(st.lists(requests(remote.plan), min_size=1, max_size=4))
    def fuzz(calls):
        for method, *args in calls:
            try:
                remote._call(method, *args)
            except DeviceLost:
                raise
            except TapmlError:
                pass

    with remote:
        fuzz()
        assert remote.device_info()["backend"] == backend
    with fresh:
        np.testing.assert_array_equal(fresh.run(*lm.decode(0, 5)), want)


@pytest.mark.parametrize("backend", ["llvm", "wgpu"])
def test_random_frames_drop_only_their_own_connection(agents, backend, tiny_artifact):
    url = agents(backend)
    port = int(url.rsplit(":", 1)[1])
    with session(agents, backend, tiny_artifact) as remote:

        @FUZZ
        @given(st.binary(min_size=1, max_size=256))
        def junk(frame):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(wire.client_hello(url.token))
                assert wire.read_line(sock, time.monotonic() + 10).startswith("ok ")
                sock.sendall(frame)
            assert remote.device_info()["backend"] == backend

        junk()
        remote.run(*CausalLM(remote.plan).decode(0, 5))


# -- the soak --------------------------------------------------------------------------------
def test_sixteen_clients_at_once_are_all_answered_and_memory_stays_flat(tiny_artifact):
    soak = bench_module("agent_soak")
    report = soak.soak("llvm", tiny_artifact("q4f32_1", "llvm"), clients=16, seconds=3.0,
                       rounds=2, timeout=30.0)  # fmt: skip
    assert soak.failures(report) == []
    for r in report["rounds"]:
        for role in ("runner", "loader", "asker", "abuser"):
            assert r["outcomes"].get(f"{role} answered", 0) + r["outcomes"].get(
                f"{role} refused", 0) > 0, f"no {role} request was answered: {r['outcomes']}"
    assert abs(report["rss_growth_mb"]) < 32, report
