"""The llvm kernel library run by a TVM RPC server, reached directly or through a tracker.

TVM's RPC runtime (python -m tvm.exec.rpc_server, the Android RPC app, TVM's browser RPC)
receives the library, loads it, and holds the plan's tensors on its CPU; this machine runs
the plan and calls each kernel remotely, so every call is a round trip (the tapml device
agent runs a whole entry point in one). TVM's RPC has no per-call timeout: `timeout` bounds
connecting (and a tracker's wait for a free server); a server that dies mid-call closes its
socket, which TVM reports at once.

TVM's server is not hardened: it binds 0.0.0.0 unless given --host, has no authentication and
runs any library a client uploads. Start it with `python -m tvm.exec.rpc_server --host
127.0.0.1` and reach it over an SSH tunnel, or only on a network whose every machine you trust.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tapml.errors import DeviceError, DeviceLost, TapmlError
from tapml.plan import Plan

from ..llvm import TvmRuntimeExecutor

if TYPE_CHECKING:
    from .address import DeviceAddress


def _guarded(method: Callable) -> Callable:
    """A public executor method whose TVM RPC failures raise DeviceLost naming the URL."""

    @functools.wraps(method)
    def call(self: TvmRpcExecutor, *args: Any, **kwargs: Any) -> Any:
        if self._session is None:
            raise DeviceLost(f"the TVM RPC session with {self.url} is closed; open it again")
        if self._within:  # run calls upload: the error names the method the caller called
            return method(self, *args, **kwargs)
        self._within = True
        try:
            return method(self, *args, **kwargs)
        except TapmlError:
            raise
        except Exception as e:  # TVM raises its own error types (RPCError, TVMError)
            self.close()
            raise DeviceLost(f"lost the TVM RPC server at {self.url} during "
                             f"{method.__name__}: {_last_line(e)}") from e  # fmt: skip
        finally:
            self._within = False

    return call


class TvmRpcExecutor(TvmRuntimeExecutor):
    """Runs the plan with the llvm kernel library loaded by a remote TVM RPC server."""

    def __init__(self, address: DeviceAddress, plan: Plan, library: Path, *, timeout: float):
        self.url, self.timeout, self._within = address.url, timeout, False
        self._session = _with_timeout(lambda: _session(address), timeout, address.url)
        try:
            super().__init__(plan, library, "cpu")
        except DeviceError:
            raise
        except TapmlError as e:
            raise DeviceError(f"{self.url}: {e}") from e
        except Exception as e:  # TVM's errors while uploading or loading the library
            raise DeviceLost(f"lost the TVM RPC server at {self.url} while loading "
                             f"{Path(library).name}: {e}") from e  # fmt: skip
        self.name = "llvm"
        self.device = f"the CPU of the TVM RPC server at {self.url}"

    def _open(self, library: Path, device: str) -> tuple[Any, Any]:
        if not library.is_file():
            raise DeviceError(f"{library} not found: compile the model for llvm first")
        self._session.upload(str(library))
        return self._session.cpu(0), self._session.load_module(library.name)

    load_params = _guarded(TvmRuntimeExecutor.load_params)
    upload = _guarded(TvmRuntimeExecutor.upload)
    download = _guarded(TvmRuntimeExecutor.download)
    reset_state = _guarded(TvmRuntimeExecutor.reset_state)
    run = _guarded(TvmRuntimeExecutor.run)
    advance = _guarded(TvmRuntimeExecutor.advance)
    launch = _guarded(TvmRuntimeExecutor.launch)
    time_call = _guarded(TvmRuntimeExecutor.time_call)

    def close(self) -> None:
        """Drop the remote tensors and the session (the server frees them)."""
        self.buffers, self._kernels, self._lib, self._session = {}, {}, None, None

    def __enter__(self) -> TvmRpcExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _session(address: DeviceAddress) -> Any:
    from tvm import rpc

    if address.scheme == "tvm-tracker":
        tracker = rpc.connect_tracker(address.host, address.port)
        return tracker.request(address.key, max_retry=1)
    return rpc.connect(address.host, address.port, key=address.key)


def _with_timeout(connect: Callable[[], Any], timeout: float, url: str) -> Any:
    """`connect()` in a thread, so a tracker with no free server cannot hang us."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["session"] = connect()
        except Exception as e:  # noqa: BLE001 - re-raised below with the URL
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise DeviceLost(f"{url}: no TVM RPC session within {timeout:.0f} s (a tracker waits for "
                         "a free server of the key: is one registered?)")  # fmt: skip
    if "error" in result:
        e = result["error"]
        raise DeviceError(f"cannot open a TVM RPC session with {url}: {_last_line(e)}") from e
    return result["session"]


def _last_line(error: Exception) -> str:
    """TVM's messages end with the line that says what happened, after a C++ traceback."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else repr(error)
