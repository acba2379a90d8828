"""The device agent: a narrow rpyc service, run ON a device, that runs plans for tapml clients.

Each connection is a session holding at most one loaded plan and its executor. A session may
stage a plan (JSON) and its kernels (kernel-record text for wgpu and opencl; a TVM native
library for llvm, metal and cuda, accepted only from an agent started with
--trust-native-code and a token), then allocate, upload and download buffers, run entry
points, launch or time single calls and reset the KV state. Every argument is checked to be a
plain value of the expected type, and every request against the loaded plan's bounds (the
executor's own checks: scalars, token ids, call indices, buffer names and sizes), before the
device is touched; the client's objects are never called, unpickled or evaluated. The
listening server is in server.py, the protocol in wire.py and docs/formats.md.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import logging
import os
import select
import shutil
import socket
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
CANCEL_POLL = 0.02  # seconds between checks, during a run, that its client is still there


@dataclass
class Agent:
    """What every session of one agent process shares: its backend, options, device lock and
    the memory staged for uploads."""

    backend: str
    wgpu_backend: str | None = None
    trust_native_code: bool = False
    token: str | None = None
    max_upload_mb: int = wire.MAX_UPLOAD_MB
    idle_timeout: float = wire.IDLE_TIMEOUT
    info: dict[str, Any] = field(default_factory=dict)
    # one device, one request at a time: sessions interleave between calls, never inside one
    lock: threading.Lock = field(default_factory=threading.Lock)
    staging: Staging = field(init=False)
    _workdir: Path | None = field(default=None, init=False)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise DeviceError(f"unknown backend {self.backend!r}; choose one of: "
                              f"{', '.join(BACKENDS)}")  # fmt: skip
        if self.trust_native_code and not self.token:
            # loopback included: any local user, or a web page, can reach a loopback port
            raise DeviceError("--trust-native-code needs a token (--token-file or "
                              f"{wire.TOKEN_ENV}): without one, anyone who reaches the agent, "
                              "loopback included, could run code as its user")  # fmt: skip
        if self.max_upload_mb < 1:
            raise DeviceError(f"--max-upload-mb must be at least 1, not {self.max_upload_mb}")
        if self.backend == "llvm":
            from ..llvm import use_threads

            use_threads(None)  # one per physical core, as local commands run (TVM: half the CPUs)
        runs = self.runs
        device = runs.device_info(TARGETS[runs.targets[0]], wgpu_backend=self.wgpu_backend)
        self.info = {"protocol": wire.VERSION, "backend": self.backend,
                     "targets": list(runs.targets), "trust_native_code": self.trust_native_code,
                     "chunk": wire.CHUNK, "max_upload_mb": self.max_upload_mb,
                     "idle_timeout": self.idle_timeout, **device}  # fmt: skip
        self.staging = Staging(self.max_upload_mb << 20)

    @property
    def runs(self) -> Backend:
        """The backend this agent runs kernels with."""
        return BACKENDS[self.backend]

    @property
    def workdir(self) -> Path:
        """Where uploaded native libraries are written while they load (made on first use)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="tapml-agent-"))
        return self._workdir

    def close(self) -> None:
        """Remove what the agent wrote to disk."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)


@dataclass
class Staging:
    """Bytes held for clients between requests (plans, kernels and buffers being sent,
    buffers being read back), by every session together, capped: a few clients must not take
    the device's memory."""

    limit: int
    used: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, nbytes: int, what: str) -> None:
        with self.lock:
            if self.used + nbytes > self.limit:
                raise DeviceError(
                    f"refused: staging {nbytes} more bytes for {what} would hold "
                    f"{(self.used + nbytes) / 2**20:.1f} MiB of transfers in progress; this "
                    f"agent holds at most {self.limit >> 20} MiB (--max-upload-mb), try again "
                    "when other clients' transfers finish"
                )  # fmt: skip
            self.used += nbytes

    def give(self, nbytes: int) -> None:
        with self.lock:
            self.used -= nbytes


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
        handle, name = tempfile.mkstemp(suffix=".so", dir=agent.workdir)
        library = Path(name)
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(kernels)
            return runs.executor(plan, library, spec)
        finally:
            library.unlink(missing_ok=True)  # loaded (or refused): the file is not needed
    from ..records import parse_records

    try:
        text = kernels.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExecutorError(f"{where} are not kernel-record text ({e})") from e
    return runs.executor(plan, parse_records(text, where), spec, wgpu_backend=agent.wgpu_backend)


def _exposed(*types: type, device: bool = True) -> Callable:
    """An rpyc-exposed method: arguments of exactly `types`, run under the device lock when it
    touches the `device`, and errors sent back as ValueError(error class name, message)."""

    def wrap(method: Callable) -> Callable:
        name = method.__name__.removeprefix("exposed_")

        @functools.wraps(method)
        def call(self: DeviceService, *args: Any) -> Any:
            # type(), not isinstance(): an rpyc netref claims the class of the object it proxies
            if [type(a) for a in args] != list(types):
                expected = ", ".join(t.__name__ for t in types)
                raise ValueError("DeviceError", f"malformed request: {name} takes ({expected})")
            try:
                if not device:
                    return method(self, *args)
                with self._agent.lock:
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

    def __init__(self, agent: Agent, peer: str, sock: socket.socket | None = None):
        self._agent, self._peer, self._sock = agent, peer, sock
        self._executor: Any = None
        self._plan: Plan | None = None
        # what this session stages, by (kind, name): kind "put", "upload" or "download"
        self._staged: dict[tuple[str, str], bytearray | bytes] = {}
        self._last_poll = 0.0

    # rpyc asks this for every attribute a client names: only the methods are reachable
    def _rpyc_getattr(self, name: str) -> Any:
        if name not in METHODS:
            raise AttributeError(f"the device agent has no method {name!r}")
        return getattr(self, "exposed_" + name)

    def on_disconnect(self, conn: Any) -> None:
        for key in list(self._staged):
            self._unstage(key)
        with self._agent.lock:
            self._drop_executor()

    # -- the service -----------------------------------------------------------------
    @_exposed(device=False)
    def exposed_info(self) -> str:
        """The device, its backend, limits and the protocol version, as JSON; answered while
        other sessions hold the device."""
        return json.dumps(self._agent.info)

    @_exposed(str, int, bytes, int, device=False)
    def exposed_put(self, what: str, offset: int, chunk: bytes, total: int) -> int:
        """Stage part of the plan ("plan", JSON text) or of its kernels ("kernels"); returns
        the bytes staged so far."""
        limit = {"plan": MAX_PLAN_TEXT, "kernels": MAX_KERNELS}.get(what)
        if limit is None:
            raise DeviceError(f"malformed request: put takes 'plan' or 'kernels', not {what!r}")
        if not 0 <= total <= limit:
            raise DeviceError(f"refused: a {what} of {total} bytes; the agent takes at most "
                              f"{limit}")  # fmt: skip
        key = ("put", what)
        if offset == 0:
            self._unstage(key)
            self._staged[key] = bytearray()
        blob = self._staged.get(key)
        if blob is None or offset != len(blob) or len(blob) + len(chunk) > total:
            raise DeviceError(f"refused: {what} chunk at offset {offset} of {len(chunk)} bytes "
                              f"does not continue the {total} bytes being sent")  # fmt: skip
        self._stage_more(key, chunk)
        return len(blob)

    @_exposed(str)
    def exposed_load(self, target: str) -> str:
        """Build the executor of the staged plan and kernels for `target`; returns info JSON."""
        if target not in TARGETS:
            raise DeviceError(f"unknown target {target!r}")
        if not {("put", "plan"), ("put", "kernels")} <= set(self._staged):
            raise DeviceError("load needs the plan and the kernels put first")
        plan_text = self._unstage(("put", "plan"))
        kernels = bytes(self._unstage(("put", "kernels")))
        try:
            document = json.loads(plan_text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DeviceError(f"the plan from {self._peer} is not JSON ({e})") from e
        plan = Plan.from_dict(document, f"the plan from {self._peer}")
        total = sum(plan.allocations())
        if total > MAX_DEVICE_BYTES:
            raise DeviceError(f"refused: the plan allocates {total} bytes; the agent allows "
                              f"{MAX_DEVICE_BYTES}")  # fmt: skip
        self._drop_executor()  # the previous plan's memory goes before the next is allocated
        for key in [k for k in self._staged if k[0] != "put"]:
            self._unstage(key)
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
        nbytes, key = self._buffer_bytes(name), ("upload", name)
        if offset == 0:
            self._unstage(key)
            self._staged[key] = bytearray()
        staged = self._staged.get(key)
        if staged is None or offset != len(staged):
            raise DeviceError(f"refused: an upload to {name} at offset {offset} does not "
                              "continue the chunks sent before")  # fmt: skip
        if offset + len(chunk) > nbytes:
            self._unstage(key)
            raise DeviceError(f"refused: an upload of {offset + len(chunk)} bytes to {name}, "
                              f"which holds {nbytes}")  # fmt: skip
        self._stage_more(key, chunk)
        if len(staged) == nbytes:
            b = self._plan.buffers[name]
            array = np.frombuffer(self._unstage(key), b["dtype"]).reshape(b["shape"])
            self._executor.upload(name, array)

    @_exposed(str, int, int)
    def exposed_download(self, name: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of buffer `name`, read from the device at offset 0."""
        nbytes, key = self._buffer_bytes(name), ("download", name)
        if not (0 <= offset <= nbytes and 0 <= length <= wire.CHUNK):
            raise DeviceError(f"refused: a download of {length} bytes at {offset} of {name} "
                              f"({nbytes} bytes; at most {wire.CHUNK} a call)")  # fmt: skip
        if offset == 0 or key not in self._staged:
            self._unstage(key)
            self._agent.staging.take(nbytes, f"reading {name}")
            try:
                self._staged[key] = self._executor.download(name).tobytes()
            except BaseException:
                self._agent.staging.give(nbytes)
                raise
        data = self._staged[key][offset : offset + length]
        if offset + length >= nbytes:
            self._unstage(key)
        return data

    @_exposed(str, str, tuple)
    def exposed_run(self, function: str, scalars: str, inputs: tuple) -> bytes | None:
        """Upload the (name, bytes) inputs and run the entry point; returns its first output's
        bytes, or None when they exceed a chunk (the client downloads them). A run whose client
        goes away stops at the next kernel launch."""
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
        output = executor.run(function, self._scalars(scalars), arrays,
                              interrupt=self._stop_if_client_left)  # fmt: skip
        return output.tobytes() if output.nbytes <= wire.CHUNK else None

    @_exposed(str, int, str)
    def exposed_launch(self, function: str, index: int, scalars: str) -> None:
        """Launch call `index` of entry point `function` alone."""
        self._loaded().launch(function, index, self._scalars(scalars))

    @_exposed(str, int, str)
    def exposed_time_call(self, function: str, index: int, scalars: str) -> float:
        """Seconds call `index` of `function` takes on the device (no network time)."""
        return float(self._loaded().time_call(function, index, self._scalars(scalars)))

    @_exposed()
    def exposed_reset_state(self) -> None:
        self._loaded().reset_state()

    def _drop_executor(self) -> None:
        if self._executor is not None:
            self._executor = None
            # wgpu's device sits in a reference cycle (its callbacks): without a collection
            # each session's device memory would stay until Python's next one
            gc.collect()
            _return_freed_memory()

    # -- staging -----------------------------------------------------------------------
    def _stage_more(self, key: tuple[str, str], chunk: bytes) -> None:
        self._agent.staging.take(len(chunk), f"{key[1]} from {self._peer}")
        self._staged[key] += chunk

    def _unstage(self, key: tuple[str, str]) -> bytearray | bytes:
        """Drop what is staged under `key` (nothing, if none); returns it."""
        data = self._staged.pop(key, b"")
        self._agent.staging.give(len(data))
        return data

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

    def _scalars(self, text: str) -> dict[str, int]:
        try:
            scalars = json.loads(text)
        except json.JSONDecodeError as e:
            raise DeviceError(f"malformed request: scalars are not JSON ({e})") from e
        if not isinstance(scalars, dict) or not all(
                type(v) is int for v in scalars.values()):  # fmt: skip
            raise DeviceError("malformed request: scalars are a JSON object of integers")
        return scalars

    def _stop_if_client_left(self) -> None:
        """Raise when this session's client has closed its connection (checked every
        CANCEL_POLL seconds): the device goes to the clients still waiting."""
        now = time.monotonic()
        if self._sock is None or now - self._last_poll < CANCEL_POLL:
            return
        self._last_poll = now
        if select.select([self._sock], [], [], 0)[0]:
            try:
                gone = self._sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                gone = True
            if gone:
                log.info("%s left during a run: cancelled", self._peer)
                raise DeviceError(f"cancelled: {self._peer} closed its connection")


METHODS = {n.removeprefix("exposed_") for n in vars(DeviceService) if n.startswith("exposed_")}


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc keeps them in each thread's arena,
    so an agent that served many sessions would look, and be, as big as at its busiest)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
