"""The client side of remote devices: executors whose buffers and kernels live on a device
(`open_executor`, for any device URL, see address.py), and `start_local_agent`, which runs an
agent on this machine for commands given no `--device`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tapml import errors
from tapml.errors import DeviceError, DeviceLost
from tapml.plan import Plan

from .. import backend_for, get_target
from ..executor import Executor
from . import wire
from .address import DeviceAddress, DeviceURL, parse_url

DEFAULT_TIMEOUT = 60.0  # seconds one call may take before the device counts as lost
LOAD_TIMEOUT = 600.0  # building a plan's kernels (WGSL pipelines, OpenCL programs) takes longer


def open_executor(
    url: str, target: str, plan: Plan, artifact_dir: Path, *,
    timeout: float = DEFAULT_TIMEOUT, token: str | None = None,
) -> Executor:  # fmt: skip
    """An executor of `plan` whose kernels (from `artifact_dir`, compiled for `target`) run on
    the device at `url`; close it (or use it as a context manager) to free the device.

    The agent's token is `token`, else the one a `start_local_agent` URL carries, else
    $TAPML_DEVICE_TOKEN. Each call that gets no answer within `timeout` seconds (building the
    kernels: LOAD_TIMEOUT) raises DeviceLost, as does a connection that closes.
    """
    address = parse_url(url)
    spec = get_target(target)
    artifact_dir = Path(artifact_dir)
    if address.scheme == "tapml":
        token = token or getattr(url, "token", None) or os.environ.get(wire.TOKEN_ENV) or None
        kernels = backend_for(target).kernels_file(artifact_dir, spec)
        return AgentExecutor(address, target, plan, kernels, token=token, timeout=timeout)
    if target != "llvm":
        raise DeviceError(f"{address.url}: a TVM RPC device runs the llvm target's kernel "
                          f"library, not {target}; for {target} start a tapml device agent "
                          "there and use tapml://HOST:PORT")  # fmt: skip
    from .tvm_rpc import TvmRpcExecutor

    return TvmRpcExecutor(address, plan, artifact_dir / spec.kernels, timeout=timeout)


def connect(address: DeviceAddress, token: str | None, timeout: float):
    """An rpyc connection to the agent at `address`, past its handshake; the agent's backend."""
    import rpyc

    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as e:
        raise DeviceError(f"cannot connect to the device agent at {address.url}: {e.strerror or e}"
                          "; is `tapml device serve` running there?") from e  # fmt: skip
    try:
        sock.sendall(wire.client_hello(token))
        answer = wire.read_line(sock, time.monotonic() + timeout)
    except (OSError, ValueError) as e:
        sock.close()
        raise DeviceLost(f"{address.url} did not complete the handshake: {e}") from e
    if not answer.startswith("ok "):
        sock.close()
        reason = answer.removeprefix("refused ")
        hint = "" if token else f" (no token given: set {wire.TOKEN_ENV} or --token-file)"
        raise DeviceError(f"the device agent at {address.url} refused the connection: "
                          f"{reason}{hint}")  # fmt: skip
    sock.settimeout(None)  # rpyc's own per-request timeout applies from here
    config = dict(wire.CONFIG, sync_request_timeout=timeout)
    return rpyc.connect_channel(wire.bounded_channel(sock), config=config), answer.split()[2]


class AgentExecutor(Executor):
    """An executor whose buffers and kernels live in a tapml device agent's session.

    `buffers` maps each plan buffer to its own name: the memory is on the agent. `run` is one
    round trip (inputs in, logits out); uploads and downloads go in chunks of wire.CHUNK.
    """

    def __init__(self, address: DeviceAddress, target: str, plan: Plan, kernels: Path, *,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT):  # fmt: skip
        # Executor.__init__ allocates through hooks; here the agent allocates on load.
        self.plan, self.name, self.url, self.timeout = plan, target, address.url, timeout
        self.buffers = {name: name for name in plan.buffers}
        if not kernels.is_file():
            raise DeviceError(f"{kernels} not found: compile the model for {target} first")
        self._conn, backend = connect(address, token, timeout)
        try:
            needed = backend_for(target).name
            if backend != needed:
                raise DeviceError(f"the device agent at {self.url} runs the {backend} "
                                  f"backend; {target} kernels need --backend {needed}")  # fmt: skip
            root = self._conn.root
            import rpyc

            self._methods = {name: rpyc.async_(getattr(root, name)) for name in (
                "info", "put", "load", "upload", "download", "run", "launch", "time_call",
                "reset_state")}  # fmt: skip
            self._put("plan", json.dumps(plan.to_dict()).encode())
            self._put("kernels", kernels.read_bytes())
            self.info = json.loads(self._call("load", target, timeout=max(timeout, LOAD_TIMEOUT)))
        except BaseException:
            self.close()
            raise
        self.device = self.info["device"]

    # -- one request -------------------------------------------------------------------
    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        from rpyc import AsyncResultTimeout

        if self._conn is None:
            raise DeviceLost(f"the device agent at {self.url} was lost earlier; open it again")
        wait = timeout or self.timeout
        try:
            result = self._methods[method](*args)
            result.set_expiry(wait)
            return result.value
        except AsyncResultTimeout as e:
            self.close()
            raise DeviceLost(f"the device agent at {self.url} did not answer {method} within "
                             f"{wait:.0f} s; it is counted as lost") from e  # fmt: skip
        except (EOFError, OSError) as e:
            self.close()
            why = str(e) or "the connection closed"
            raise DeviceLost(f"lost the device agent at {self.url} during {method}: {why}"
                             ) from e  # fmt: skip
        except ValueError as e:  # the agent's errors: (error class name, message)
            kind, message = (e.args + ("", ""))[:2] if len(e.args) == 2 else ("", str(e))
            cls = getattr(errors, str(kind), None)
            if not (isinstance(cls, type) and issubclass(cls, errors.TapmlError)):
                cls = DeviceError
            raise cls(f"{self.url}: {message}") from None

    def _put(self, what: str, data: bytes) -> None:
        view = memoryview(data)
        for offset in range(0, max(len(data), 1), wire.CHUNK):
            self._call("put", what, offset, bytes(view[offset : offset + wire.CHUNK]), len(data))

    # -- executor hooks and API ----------------------------------------------------------
    def _upload(self, name: str, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        for offset in range(0, max(len(data), 1), wire.CHUNK):
            self._call("upload", name, offset, bytes(data[offset : offset + wire.CHUNK]))

    def _download(self, name: str) -> np.ndarray:
        nbytes, b = self.plan.nbytes(name), self.plan.buffers[name]
        parts = [self._call("download", name, offset, min(wire.CHUNK, nbytes - offset))
                 for offset in range(0, max(nbytes, 1), wire.CHUNK)]  # fmt: skip
        return _array(b"".join(parts), b)

    def reset_state(self) -> None:
        self._call("reset_state")

    def run(self, function: str, scalars: Mapping[str, int], inputs: Mapping[str, np.ndarray]
            ) -> np.ndarray:  # fmt: skip
        """Run one entry point on the device in one round trip; returns its first output."""
        small = []
        for name, array in inputs.items():
            if array.nbytes > wire.CHUNK // 2:
                self.upload(name, array)
            else:
                small.append((name, np.ascontiguousarray(array).tobytes()))
        data = self._call("run", function, _json(scalars), tuple(small))
        output = self.plan.functions[function]["outputs"][0]
        return self.download(output) if data is None else _array(data, self.plan.buffers[output])

    def launch(self, function: str, index: int, scalars: Mapping[str, int]) -> None:
        self._call("launch", function, index, _json(scalars))

    def time_call(self, function: str, index: int, scalars: Mapping[str, int]) -> float:
        """Seconds the call takes on the device, network time excluded."""
        return self._call("time_call", function, index, _json(scalars))

    def device_info(self) -> dict[str, Any]:
        """The agent's report (protocol, backend, device, limits), asked anew: one round trip."""
        return json.loads(self._call("info"))

    def close(self) -> None:
        """End the session at once (the agent frees the plan's buffers, and stops a run it
        is in the middle of)."""
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:
            wire.hang_up(conn)

    def __enter__(self) -> AgentExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _json(scalars: Mapping[str, int]) -> str:
    return json.dumps({k: int(v) for k, v in scalars.items()})


def _array(data: bytes, buffer: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(data, buffer["dtype"]).reshape(buffer["shape"]).copy()


def device_info(url: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
                ) -> dict[str, Any]:  # fmt: skip
    """What the agent at `url` reports: protocol, backend, device, limits."""
    address = parse_url(url)
    if address.scheme != "tapml":
        raise DeviceError(f"{url}: `device info` asks tapml device agents (tapml://HOST:PORT)")
    token = token or getattr(url, "token", None) or os.environ.get(wire.TOKEN_ENV) or None
    conn, _ = connect(address, token, timeout)
    try:
        return json.loads(conn.root.info())
    except TimeoutError as e:  # rpyc's AsyncResultTimeout
        raise DeviceLost(f"the device agent at {address.url} did not answer within "
                         f"{timeout:.0f} s") from e  # fmt: skip
    except (EOFError, OSError) as e:
        raise DeviceLost(f"lost the device agent at {address.url}: {e}") from e
    finally:
        wire.hang_up(conn)


@contextlib.contextmanager
def start_local_agent(backend: str, *, wgpu_backend: str | None = None,
                      trust_native_code: bool = False, startup_timeout: float = 60.0,
                      options: Mapping[str, Any] | None = None) -> Iterator[DeviceURL]:  # fmt: skip
    """Run `tapml device serve` on a free loopback port with a fresh token; yields its URL
    (a DeviceURL carrying the token, which open_executor uses, and the agent's pid) and stops
    the agent after. `options` are more of serve's options, e.g. {"idle_timeout": 5}."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="tapml-agent-") as tmp:
        token_file, log_file = Path(tmp) / "token", Path(tmp) / "agent.log"
        token_file.write_text(token)
        token_file.chmod(0o600)
        command = [sys.executable, "-m", "tapml", "device", "serve", "--backend", backend,
                   "--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file)]
        command += ["--wgpu-backend", wgpu_backend] * bool(wgpu_backend)
        command += ["--trust-native-code"] * trust_native_code
        for name, value in (options or {}).items():
            command += ["--" + name.replace("_", "-"), str(value)]
        with open(log_file, "wb") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log,
                                       stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            url = _wait_for_url(process, log_file, startup_timeout)
            yield DeviceURL(url, token, process.pid)
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a server process as a user would (SIGTERM: it cleans up after itself), killed if
    it has not ended within `timeout` seconds; its stdout pipe closed."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _wait_for_url(process: subprocess.Popen, log_file: Path, timeout: float) -> str:
    """The URL the agent prints once it listens (its first line on stdout)."""
    import selectors

    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=min(0.5, max(deadline - time.monotonic(), 0))):
                line = process.stdout.readline().decode().strip()
                if line.startswith("tapml://"):
                    return line
                if not line and process.poll() is not None:
                    break
            elif process.poll() is not None:
                break
    tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
    state = "exited" if process.poll() is not None else f"did not start within {timeout:.0f} s"
    raise DeviceError("the local device agent " + state + (": " + " | ".join(tail) if tail else ""))
