"""The device agent: a narrow rpyc service, run ON a device, that runs plans for tapml clients.

Each connection is a session holding at most one loaded plan and its executor. A session may
stage a plan (JSON) and its kernels (kernel-record text for wgpu and opencl; a TVM native
library for llvm, metal and cuda, accepted only from an agent started with
--trust-native-code), then allocate, upload and download buffers, run entry points, launch
or time single calls and reset the KV state. Every argument is checked to be a plain value of
the expected type before it is used; the client's objects are never called, unpickled or
evaluated. The protocol is in wire.py and docs/formats.md.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rpyc

from tapml.errors import DeviceError, ExecutorError, TapmlError
from tapml.plan import Plan

from .. import BACKENDS, TARGETS, Backend
from . import wire

log = logging.getLogger("tapml")

MAX_PLAN_TEXT = 64 << 20
MAX_KERNELS = 512 << 20
MAX_DEVICE_BYTES = 16 << 30  # what one plan may allocate: storages and own buffers
HANDSHAKE_TIMEOUT = 10.0


@dataclass
class Agent:
    """What every session of one agent process shares: its backend, options and device lock."""

    backend: str
    wgpu_backend: str | None = None
    trust_native_code: bool = False
    token: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # one device, one request at a time: sessions interleave between calls, never inside one
    lock: threading.Lock = field(default_factory=threading.Lock)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tapml-agent-")))

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise DeviceError(f"unknown backend {self.backend!r}; choose one of: "
                              f"{', '.join(BACKENDS)}")  # fmt: skip
        if self.backend == "llvm":
            from ..llvm import use_threads

            use_threads(None)  # one per physical core, as local commands run (TVM: half the CPUs)
        runs = self.runs
        device = runs.device_info(TARGETS[runs.targets[0]], wgpu_backend=self.wgpu_backend)
        self.info = {"protocol": wire.VERSION, "backend": self.backend,
                     "targets": list(runs.targets), "trust_native_code": self.trust_native_code,
                     "chunk": wire.CHUNK, **device}  # fmt: skip

    @property
    def runs(self) -> Backend:
        """The backend this agent runs kernels with."""
        return BACKENDS[self.backend]


def build_executor(agent: Agent, target: str, plan: Plan, kernels: bytes, where: str):
    """An executor for `plan` on the agent's device, from kernels sent by a client."""
    runs = agent.runs
    if target not in runs.targets:
        raise DeviceError(f"this agent's backend {agent.backend} runs targets "
                          f"{', '.join(runs.targets)}, not {target}")  # fmt: skip
    spec = TARGETS[target]
    if runs.native:
        if not agent.trust_native_code:
            raise DeviceError(
                f"the {agent.backend} backend runs a native kernel library (a .so, which can do "
                "anything on this device); this agent was started without --trust-native-code, "
                "so it refuses native code. Restart it with --trust-native-code if you trust "
                "every client that holds its token"
            )
        library = Path(tempfile.mkstemp(suffix=".so", dir=agent.workdir)[1])
        library.write_bytes(kernels)
        return runs.executor(plan, library, spec)
    from ..records import parse_records

    try:
        text = kernels.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExecutorError(f"{where} are not kernel-record text ({e})") from e
    return runs.executor(plan, parse_records(text, where), spec, wgpu_backend=agent.wgpu_backend)


def _exposed(*types: type) -> Callable:
    """An rpyc-exposed method: arguments of exactly `types`, run under the device lock, and
    errors sent back as ValueError(error class name, message)."""

    def wrap(method: Callable) -> Callable:
        name = method.__name__.removeprefix("exposed_")

        @functools.wraps(method)
        def call(self: DeviceService, *args: Any) -> Any:
            # type(), not isinstance(): an rpyc netref claims the class of the object it proxies
            if [type(a) for a in args] != list(types):
                expected = ", ".join(t.__name__ for t in types)
                raise ValueError("DeviceError", f"malformed request: {name} takes ({expected})")
            with self._agent.lock:
                try:
                    return method(self, *args)
                except TapmlError as e:
                    raise ValueError(type(e).__name__, str(e)) from None
                except Exception as e:  # noqa: BLE001 - a bad request must not end the agent
                    log.exception("%s failed", name)
                    raise ValueError("DeviceError", f"{name} failed on the device agent: "
                                     f"{type(e).__name__}: {e}") from None  # fmt: skip

        return call

    return wrap


class DeviceService(rpyc.Service):
    """One client's session: staged blobs, the loaded plan's executor, partial transfers."""

    def __init__(self, agent: Agent, peer: str):
        self._agent, self._peer = agent, peer
        self._blobs: dict[str, bytearray] = {}
        self._executor: Any = None
        self._plan: Plan | None = None
        self._libraries: list[Path] = []
        self._uploads: dict[str, bytearray] = {}
        self._downloads: dict[str, bytes] = {}

    # rpyc asks this for every attribute a client names: only the methods are reachable
    def _rpyc_getattr(self, name: str) -> Any:
        if name not in METHODS:
            raise AttributeError(f"the device agent has no method {name!r}")
        return getattr(self, "exposed_" + name)

    def on_disconnect(self, conn: Any) -> None:
        with self._agent.lock:
            self._executor = None
            self._blobs.clear()

    # -- the service -----------------------------------------------------------------
    @_exposed()
    def exposed_info(self) -> str:
        """The device, its backend, limits and the protocol version, as JSON."""
        return json.dumps(self._agent.info)

    @_exposed(str, int, bytes, int)
    def exposed_put(self, what: str, offset: int, chunk: bytes, total: int) -> int:
        """Stage part of the plan ("plan", JSON text) or of its kernels ("kernels"); returns
        the bytes staged so far."""
        limit = {"plan": MAX_PLAN_TEXT, "kernels": MAX_KERNELS}.get(what)
        if limit is None:
            raise DeviceError(f"malformed request: put takes 'plan' or 'kernels', not {what!r}")
        if not 0 <= total <= limit:
            raise DeviceError(f"refused: a {what} of {total} bytes; the agent takes at most "
                              f"{limit}")  # fmt: skip
        if offset == 0:
            self._blobs[what] = bytearray()
        blob = self._blobs.get(what)
        if blob is None or offset != len(blob) or len(blob) + len(chunk) > total:
            raise DeviceError(f"refused: {what} chunk at offset {offset} of {len(chunk)} bytes "
                              f"does not continue the {total} bytes being sent")  # fmt: skip
        blob += chunk
        return len(blob)

    @_exposed(str)
    def exposed_load(self, target: str) -> str:
        """Build the executor of the staged plan and kernels for `target`; returns info JSON."""
        if target not in TARGETS:
            raise DeviceError(f"unknown target {target!r}")
        if set(self._blobs) != {"plan", "kernels"}:
            raise DeviceError("load needs the plan and the kernels put first")
        plan_text, kernels = self._blobs.pop("plan"), bytes(self._blobs.pop("kernels"))
        try:
            document = json.loads(plan_text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DeviceError(f"the plan from {self._peer} is not JSON ({e})") from e
        plan = Plan.from_dict(document, f"the plan from {self._peer}")
        roots = [n for n, b in plan.buffers.items() if b["kind"] not in ("temp", "view")]
        total = sum(plan.storages.values()) + sum(plan.nbytes(n) for n in roots)
        if total > MAX_DEVICE_BYTES:
            raise DeviceError(f"refused: the plan allocates {total} bytes; the agent allows "
                              f"{MAX_DEVICE_BYTES}")  # fmt: skip
        self._executor = None  # the previous plan's memory goes before the next is allocated
        self._uploads.clear()
        self._downloads.clear()
        started = time.perf_counter()
        self._executor = build_executor(self._agent, target, plan, kernels,
                                        f"the {target} kernels from {self._peer}")  # fmt: skip
        self._plan = plan
        log.info("%s loaded a %s plan of %d kernels in %.1f s", self._peer, target,
                 len(plan.kernels), time.perf_counter() - started)  # fmt: skip
        return json.dumps({**self._agent.info, "executor": self._executor.name})

    @_exposed(str, int, bytes)
    def exposed_upload(self, name: str, offset: int, chunk: bytes) -> None:
        """Write the chunk at `offset` of buffer `name`; the buffer is written to the device
        when its last byte arrives (chunks come in order)."""
        nbytes = self._buffer_bytes(name)
        if offset == 0:
            self._uploads[name] = bytearray()
        staged = self._uploads.get(name)
        if staged is None or offset != len(staged):
            raise DeviceError(f"refused: an upload to {name} at offset {offset} does not "
                              "continue the chunks sent before")  # fmt: skip
        if offset + len(chunk) > nbytes:
            del self._uploads[name]
            raise DeviceError(f"refused: an upload of {offset + len(chunk)} bytes to {name}, "
                              f"which holds {nbytes}")  # fmt: skip
        staged += chunk
        if len(staged) == nbytes:
            b = self._plan.buffers[name]
            array = np.frombuffer(self._uploads.pop(name), b["dtype"]).reshape(b["shape"])
            self._executor.upload(name, array)

    @_exposed(str, int, int)
    def exposed_download(self, name: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of buffer `name`, read from the device at offset 0."""
        nbytes = self._buffer_bytes(name)
        if not (0 <= offset <= nbytes and 0 <= length <= wire.CHUNK):
            raise DeviceError(f"refused: a download of {length} bytes at {offset} of {name} "
                              f"({nbytes} bytes; at most {wire.CHUNK} a call)")  # fmt: skip
        if offset == 0 or name not in self._downloads:
            self._downloads[name] = self._executor.download(name).tobytes()
        data = self._downloads[name][offset : offset + length]
        if offset + length >= nbytes:
            del self._downloads[name]
        return data

    @_exposed(str, str, tuple)
    def exposed_run(self, function: str, scalars: str, inputs: tuple) -> bytes | None:
        """Upload the (name, bytes) inputs and run the entry point; returns its first output's
        bytes, or None when they exceed a chunk (the client downloads them)."""
        executor, arrays = self._loaded(), {}
        for item in inputs:
            if type(item) is not tuple or len(item) != 2 or type(item[0]) is not str \
                    or type(item[1]) is not bytes:  # fmt: skip
                raise DeviceError("malformed request: run's inputs are (name, bytes) pairs")
            name, data = item
            if len(data) != self._buffer_bytes(name):
                raise DeviceError(f"refused: {len(data)} bytes for input {name}, which holds "
                                  f"{self._buffer_bytes(name)}")  # fmt: skip
            b = self._plan.buffers[name]
            arrays[name] = np.frombuffer(data, b["dtype"]).reshape(b["shape"])
        output = executor.run(function, self._scalars(scalars), arrays)
        return output.tobytes() if output.nbytes <= wire.CHUNK else None

    @_exposed(str, int, str)
    def exposed_launch(self, function: str, index: int, scalars: str) -> None:
        """Launch call `index` of entry point `function` alone."""
        self._check_call(function, index)
        self._executor.launch(function, index, self._scalars(scalars))

    @_exposed(str, int, str)
    def exposed_time_call(self, function: str, index: int, scalars: str) -> float:
        """Seconds call `index` of `function` takes on the device (no network time)."""
        self._check_call(function, index)
        return float(self._executor.time_call(function, index, self._scalars(scalars)))

    @_exposed()
    def exposed_reset_state(self) -> None:
        self._loaded().reset_state()

    # -- checks ----------------------------------------------------------------------
    def _loaded(self) -> Any:
        if self._executor is None:
            raise DeviceError("no plan is loaded in this session: load one first")
        return self._executor

    def _buffer_bytes(self, name: str) -> int:
        self._loaded()
        if name not in self._plan.buffers:
            raise ExecutorError(f"the loaded plan has no buffer {name!r}")
        return self._plan.nbytes(name)

    def _check_call(self, function: str, index: int) -> None:
        self._loaded()
        if function not in self._plan.functions:
            raise ExecutorError(f"the plan has no entry point {function!r}")
        calls = self._plan.functions[function]["calls"]
        if not 0 <= index < len(calls):
            raise ExecutorError(f"{function} has calls 0..{len(calls) - 1}, not {index}")

    def _scalars(self, text: str) -> dict[str, int]:
        try:
            scalars = json.loads(text)
        except json.JSONDecodeError as e:
            raise DeviceError(f"malformed request: scalars are not JSON ({e})") from e
        if not isinstance(scalars, dict) or not all(
                type(v) is int for v in scalars.values()):  # fmt: skip
            raise DeviceError("malformed request: scalars are a JSON object of integers")
        return scalars


METHODS = {n.removeprefix("exposed_") for n in vars(DeviceService) if n.startswith("exposed_")}


# -- the server ----------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(agent: Agent, host: str, port: int, ready: Callable[[str, int], None] | None = None
          ) -> None:  # fmt: skip
    """Serve clients until interrupted; `ready(host, port)` is called once listening."""
    server = make_server(agent, host, port)
    with server:
        if ready is not None:
            ready(*server.server_address[:2])
        server.serve_forever()


def make_server(agent: Agent, host: str, port: int) -> socketserver.ThreadingTCPServer:
    """A listening server whose threads each serve one client (handshake, then rpyc)."""
    import rpyc

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock, peer = self.request, "{}:{}".format(*self.client_address[:2])
            try:
                sock.settimeout(HANDSHAKE_TIMEOUT)
                refusal = check_hello(wire.read_line(sock), agent.token)
            except (OSError, ValueError, ConnectionError) as e:
                log.info("%s: handshake failed (%s)", peer, e)
                return
            if refusal:
                log.warning("%s refused: %s", peer, refusal)
                sock.sendall(f"refused {refusal}\n".encode())
                return
            sock.sendall(f"ok {wire.VERSION} {agent.backend}\n".encode())
            sock.settimeout(None)
            log.info("%s connected", peer)
            conn = rpyc.connect_channel(wire.bounded_channel(sock),
                                        service=DeviceService(agent, peer),
                                        config=dict(wire.CONFIG))  # fmt: skip
            try:
                conn.serve_all()
            finally:
                log.info("%s disconnected", peer)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    return Server((host, port), Handler)


def check_hello(line: str, token: str | None) -> str | None:
    """Why a client's handshake line is refused, or None."""
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != wire.MAGIC:
        return "not a tapml device client"
    if parts[1] != str(wire.VERSION):
        return (f"the client speaks protocol {parts[1]}, this agent {wire.VERSION}: use the "
                "same tapml version on both")  # fmt: skip
    try:
        sent = bytes.fromhex(parts[2])
    except ValueError:
        return "a malformed token"
    if token is None:
        return None
    if not sent:
        return "this agent needs a token (--token-file or TAPML_DEVICE_TOKEN on the client)"
    if not hmac.compare_digest(sent, token.encode()):
        return "wrong token"
    return None
