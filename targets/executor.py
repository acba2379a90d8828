"""The executor contract: run a plan's kernels on one backend.

The base class owns the plan: it allocates every buffer through the backend's hooks
(temporaries as views of shared storages), resolves each call's arguments once, and runs
an entry point by evaluating scalar arguments and launching kernels in order. A backend
fills in the hooks: `_alloc`, `_view`, `_upload`, `_download`, `_launch`, `_sync`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tapml.errors import ExecutorError
from tapml.plan import Plan, evaluate


class Executor:
    """Runs the entry points of a plan; subclasses implement the backend hooks."""

    name = "base"
    # whether `_alloc` gives zeroed memory (fresh pages of the OS): the KV state then needs no
    # zeroing at load, and its pages are not touched (resident) before it is used
    allocates_zeroed = False
    # whether its kernels can read weights in place from shards mapped into this process
    maps_weights = False

    def __init__(self, plan: Plan):
        self.plan = plan
        self.buffers: dict[str, Any] = {}
        storages = {s: self._alloc(n) for s, n in plan.storages.items()}
        for name in plan.owners():
            b = plan.buffers[name]
            self.buffers[name] = self._view(self._alloc(plan.nbytes(name)), b["shape"], b["dtype"])
        for name in plan.names("temp"):
            b = plan.buffers[name]
            self.buffers[name] = self._view(storages[b["storage"]], b["shape"], b["dtype"])
        for name, b in plan.buffers.items():
            if b["kind"] == "view":
                base = self.buffers[plan.root(name)]
                self.buffers[name] = self._view(base, b["shape"], b["dtype"])
        if not self.allocates_zeroed:
            self.reset_state()

    # -- backend hooks ---------------------------------------------------------------
    def _alloc(self, nbytes: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement _alloc")

    def _view(self, base: Any, shape: list[int], dtype: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement _view")

    def _upload(self, buffer: Any, array: np.ndarray) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _upload")

    def _download(self, buffer: Any) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement _download")

    def _launch(self, kernel: str, args: list[Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _launch")

    def _sync(self) -> None:
        pass

    def _bind(self, array: np.ndarray) -> Any:
        """A buffer of the backend over `array`'s memory (for `maps_weights`)."""
        raise NotImplementedError(f"{type(self).__name__} maps no weights")

    def _host_array(self, buffer: Any) -> np.ndarray | None:
        """The buffer's memory as a numpy array where this process can write it in place, so
        weights are read straight into it; None where uploads must copy (a GPU's)."""
        return None

    # -- public API ------------------------------------------------------------------
    def load_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Upload every parameter the plan names; a missing or misshapen one is an error.

        From an artifact's `WeightShards`, parameters in memory this process writes in place
        are read straight into it from the files (one read, no copy in between); the others
        are uploaded from the mapped shards. An executor that `maps_weights` runs its kernels on
        the mapped shards in place where their alignment allows: nothing is read or copied."""
        from tapml.weights import WeightShards

        names = self.plan.names("param")
        for name in names:
            if name not in params:
                raise ExecutorError(f"weights have no parameter {name!r} that the plan needs")
        direct: dict[str, np.ndarray] = {}  # in this process's memory: read into, or mapped
        reads: dict[str, np.ndarray] = {}
        if isinstance(params, WeightShards):
            for name in names:
                host = self._host_array(self.buffers[name])
                if host is None:
                    continue
                self._check_spec(name, *params.spec(name))
                mapped = params.mapped(name) if self.maps_weights else None
                if mapped is None:
                    reads[name] = direct[name] = host
                else:  # its own memory stays untouched, never resident
                    self.buffers[name] = self._bind(mapped)
                    direct[name] = mapped
            params.read_into(reads)
            self._view_again({n for n in direct if n not in reads})
        for name in names:
            if name in direct:
                self.plan.check_values(name, direct[name])
            else:
                self.upload(name, params[name])

    def _view_again(self, rebound: set[str]) -> None:
        """Views of buffers given other memory (`_bind`) view that memory now (an imported
        graph reshapes weights in place)."""
        for name, b in self.plan.buffers.items():
            if b["kind"] == "view" and self.plan.root(name) in rebound:
                self.buffers[name] = self._view(self.buffers[self.plan.root(name)], b["shape"],
                                                b["dtype"])  # fmt: skip

    def _check_spec(self, name: str, shape: list[int], dtype: str) -> None:
        b = self.plan.buffers[name]
        if list(shape) != b["shape"] or str(dtype) != b["dtype"]:
            raise ExecutorError(f"{name}: expected {b['dtype']}{b['shape']}, got {dtype}{shape}")

    def upload(self, name: str, array: np.ndarray) -> None:
        self._check_spec(name, list(array.shape), str(array.dtype))
        self.plan.check_values(name, array)
        self._upload(self.buffers[name], np.ascontiguousarray(array))

    def download(self, name: str) -> np.ndarray:
        self._sync()
        return self._download(self.buffers[name])

    def reset_state(self) -> None:
        """Zero the KV state (stale rows are never read, but NaN garbage must not exist)."""
        for name in self.plan.names("state"):
            b = self.plan.buffers[name]
            self._upload(self.buffers[name], np.zeros(b["shape"], b["dtype"]))

    def run(self, function: str, scalars: Mapping[str, int], inputs: Mapping[str, np.ndarray],
            interrupt: Callable[[], None] | None = None) -> np.ndarray:  # fmt: skip
        """Run one entry point; returns its first output (the logits). `interrupt` is called
        between kernel launches, where a backend launches them one by one: it raises to stop
        the run (the device agent's, when the client has gone)."""
        f = self.begin_run(function, scalars, inputs)
        for call in f["calls"]:
            if interrupt is not None:
                interrupt()
            self._launch(call["kernel"], self._args(call, scalars))
        return self.download(f["outputs"][0])

    def advance(self, function: str, scalars: Mapping[str, int],
                inputs: Mapping[str, np.ndarray]) -> None:  # fmt: skip
        """Run an entry point for its state alone (a prefill chunk before the last): a
        backend that launches calls one by one from Python may launch only
        `Plan.state_calls`; this one runs it whole."""
        self.run(function, scalars, inputs)

    def begin_run(self, function: str, scalars: Mapping[str, int],
                  inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:  # fmt: skip
        """Check the scalars and upload the inputs of a run; returns the plan's function."""
        self.plan.check_scalars(function, dict(scalars))
        f = self.plan.functions[function]
        for name, array in inputs.items():
            self.upload(name, array)
        return f

    def launch(self, function: str, index: int, scalars: Mapping[str, int]) -> None:
        """Launch call `index` of entry point `function` alone (carving, offloading)."""
        call = self.plan.check_call(function, index, dict(scalars))
        self._launch(call["kernel"], self._args(call, scalars))

    def time_call(self, function: str, index: int, scalars: Mapping[str, int]) -> float:
        """Seconds call `index` of `function` takes, synchronized."""
        call = self.plan.check_call(function, index, dict(scalars))
        args = self._args(call, scalars)
        self._sync()
        start = time.perf_counter()
        self._launch(call["kernel"], args)
        self._sync()
        return time.perf_counter() - start

    def _args(self, call: dict[str, Any], scalars: Mapping[str, int]) -> list[Any]:
        return [
            self.buffers[a["buffer"]] if "buffer" in a else evaluate(a["scalar"], scalars)
            for a in call["args"]
        ]
