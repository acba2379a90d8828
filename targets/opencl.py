"""The opencl target: TVM's OpenCL C kernels, built and launched on any OpenCL device."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapml.errors import ExecutorError
from tapml.plan import Plan, evaluate

from . import TargetSpec
from .executor import Executor

DEVICE_ENV = "TAPML_OPENCL_DEVICE"


@dataclass
class CLView:
    """A buffer as the plan sees it: views share their base's cl.Buffer (always at offset 0)."""

    mem: Any  # pyopencl.Buffer
    shape: tuple[int, ...]
    dtype: np.dtype


class Dispatch:
    """One __kernel launch of a plan call: its own cl.Kernel, so bound buffers stay bound."""

    def __init__(self, name: str, program: Any, record: dict[str, Any]):
        import pyopencl as cl

        self.name, self.entry = name, record["entry"]
        self.kernel = cl.Kernel(program, self.entry)
        args = record["args"]
        self.buffers = [(i, a["buffer"]) for i, a in enumerate(args) if "buffer" in a]
        # TVM's codegen declares int64 scalars as `long`: the value must be packed as 8 bytes
        self.pods = [(i, np.dtype(a["pod"]).type, a["expr"]) for i, a in enumerate(args)
                     if "pod" in a]  # fmt: skip
        self.grid, self.local = record["grid"], record["workgroup"]
        self.sizes = None
        if all(isinstance(v, int) for v in self.grid + self.local):
            self.sizes = self._sizes({})

    def bind(self, args: list[Any]) -> None:
        """Set the buffer arguments from a call's arguments (in kernel parameter order)."""
        for i, param in self.buffers:
            self.kernel.set_arg(i, args[param].mem)

    def _sizes(self, env: Mapping[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        local = tuple(int(evaluate(v, env)) for v in self.local)
        grid = (int(evaluate(g, env)) for g in self.grid)
        return tuple(g * n for g, n in zip(grid, local, strict=True)), local  # OpenCL: global

    def enqueue(self, queue: Any, env: Mapping[str, int]) -> None:
        import pyopencl as cl

        for i, kind, expr in self.pods:
            self.kernel.set_arg(i, kind(evaluate(expr, env)))
        global_size, local = self.sizes or self._sizes(env)
        if 0 in global_size:  # an empty grid is an error in OpenCL 1.2, and does nothing anyway
            return
        try:
            cl.enqueue_nd_range_kernel(queue, self.kernel, global_size, local)
        except cl.Error as e:
            raise ExecutorError(
                f"kernel {self.name} ({self.entry}) failed to launch with global size "
                f"{global_size}, local size {local}: {e}"
            ) from e


class OpenCLExecutor(Executor):
    name = "opencl"

    def __init__(self, plan: Plan, kernels: Path | Mapping[str, dict], spec: TargetSpec):
        try:
            import pyopencl as cl
        except ImportError as e:
            raise ExecutorError("the opencl target needs pyopencl: pip install pyopencl") from e
        from .records import resolve_records

        self._cl, self.spec = cl, spec
        self.platform, self.device = pick_device()
        if plan.uses_float16 and not has_fp16(self.device):
            raise ExecutorError(
                f"OpenCL device {self.device.name.strip()} has no fp16 (cl_khr_fp16), which this "
                f"{plan.model.get('quantization')} model computes or caches in; compile it with "
                "--quantization q4f32_1 (and --kv-cache float32)"
            )
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)  # in order: launches run as enqueued
        records, where = resolve_records(kernels)
        self._records: dict[str, dict[str, Any]] = {}
        self._programs: dict[str, Any] = {}
        built: dict[str, Any] = {}  # source -> program: equal kernels share one build
        for kernel in plan.kernels:
            if kernel not in records:
                raise ExecutorError(
                    f"{where} has no kernel {kernel!r}; compile the model again"
                )
            record = self._records[kernel] = records[kernel]
            if record["source"] not in built:
                built[record["source"]] = self._build(kernel, record["source"])
            self._programs[kernel] = built[record["source"]]
        super().__init__(plan)
        self._calls = {fname: [self._prepare(call) for call in f["calls"]]
                       for fname, f in plan.functions.items()}  # fmt: skip
        self._loose: dict[str, list[Dispatch]] = {}

    def _build(self, kernel: str, source: str) -> Any:
        cl = self._cl
        program = cl.Program(self.context, source)
        try:
            return program.build()
        except cl.Error as e:
            log = program.get_build_info(self.device, cl.program_build_info.LOG).strip()
            first = "\n".join(log.splitlines()[:8]) or str(e)
            raise ExecutorError(
                f"kernel {kernel} does not build for {self.device.name.strip()}:\n{first}"
            ) from e

    def _dispatches(self, kernel: str) -> list[Dispatch]:
        """The kernel's launches, each checked against what the device runs per workgroup."""
        dispatches = [Dispatch(kernel, self._programs[kernel], d)
                      for d in self._records[kernel]["dispatches"]]  # fmt: skip
        for d in dispatches:
            most = d.kernel.get_work_group_info(self._cl.kernel_work_group_info.WORK_GROUP_SIZE,
                                                self.device)  # fmt: skip
            if np.prod(d.local) > most:  # static: gpu.check_limits refuses any other
                raise ExecutorError(
                    f"kernel {kernel} ({d.entry}) uses workgroups of {np.prod(d.local)} threads; "
                    f"{self.device.name.strip()} runs at most {most}"
                )
        return dispatches

    def _prepare(self, call: dict[str, Any]) -> tuple[list[tuple[str, Any]], list[Dispatch]]:
        """A call's scalar parameters (name, expression) and its dispatches, buffers bound."""
        kernel, record = call["kernel"], self._records[call["kernel"]]
        if len(call["args"]) != len(record["params"]):
            raise ExecutorError(
                f"kernel {kernel} takes {len(record['params'])} arguments, the plan passes "
                f"{len(call['args'])}; compile the model again"
            )
        args = [self.buffers.get(a.get("buffer")) for a in call["args"]]
        dispatches = self._dispatches(kernel)
        for d in dispatches:
            d.bind(args)
        scalars = [(p, a["scalar"]) for p, a in zip(record["params"], call["args"], strict=True)
                   if "scalar" in a]  # fmt: skip
        return scalars, dispatches

    # -- backend hooks ---------------------------------------------------------------
    def _alloc(self, nbytes: int) -> Any:
        cl = self._cl
        try:
            return cl.Buffer(self.context, cl.mem_flags.READ_WRITE, max(nbytes, 1))
        except cl.Error as e:
            raise ExecutorError(
                f"allocating {nbytes / 2**20:.1f} MiB failed on {self.device.name.strip()}: {e}"
            ) from e

    def _view(self, base: Any, shape: list[int], dtype: str) -> CLView:
        mem = base.mem if isinstance(base, CLView) else base
        return CLView(mem, tuple(shape), np.dtype(dtype))

    def _upload(self, buffer: CLView, array: np.ndarray) -> None:
        self._cl.enqueue_copy(self.queue, buffer.mem, array, is_blocking=True)

    def _download(self, buffer: CLView) -> np.ndarray:
        out = np.empty(buffer.shape, buffer.dtype)
        self._cl.enqueue_copy(self.queue, out, buffer.mem, is_blocking=True)
        return out

    def _launch(self, kernel: str, args: list[Any]) -> None:
        # Outside `run` (timing single calls), kernels rebind their buffers on every launch.
        if kernel not in self._loose:
            self._loose[kernel] = self._dispatches(kernel)
        params = self._records[kernel]["params"]
        env = {p: a for p, a in zip(params, args, strict=True) if not isinstance(a, CLView)}
        for d in self._loose[kernel]:
            d.bind(args)
            d.enqueue(self.queue, env)

    def _sync(self) -> None:
        self.queue.finish()

    def run(self, function: str, scalars: Mapping[str, int], inputs: Mapping[str, np.ndarray],
            interrupt: Callable[[], None] | None = None) -> np.ndarray:  # fmt: skip
        """Run one entry point with the calls prepared at load: only scalars are set per run."""
        f = self.begin_run(function, scalars, inputs)
        for call_scalars, dispatches in self._calls[function]:
            if interrupt is not None:
                interrupt()
            env = {p: evaluate(expr, scalars) for p, expr in call_scalars}
            for d in dispatches:
                d.enqueue(self.queue, env)
        return self.download(f["outputs"][0])


def has_fp16(device: Any) -> bool:
    return "cl_khr_fp16" in device.extensions.split()


def devices() -> list[tuple[Any, Any]]:
    """Every (platform, device) the installed OpenCL drivers offer."""
    import pyopencl as cl

    try:
        platforms = cl.get_platforms()
    except cl.Error:  # no ICD installed: the loader reports "platform not found"
        return []
    found = []
    for platform in platforms:
        try:
            found += [(platform, d) for d in platform.get_devices()]
        except cl.Error:
            continue
    return found


def pick_device() -> tuple[Any, Any]:
    """$TAPML_OPENCL_DEVICE (an index or part of a name), else the first GPU, else the first."""
    import pyopencl as cl

    found = devices()
    if not found:
        raise ExecutorError(
            "no OpenCL device found; install your GPU's OpenCL driver (or PoCL for the CPU: "
            "apt install pocl-opencl-icd)"
        )
    names = [f"{p.name.strip()}: {d.name.strip()}" for p, d in found]
    wanted = os.environ.get(DEVICE_ENV, "").strip()
    if wanted:
        if wanted.isdigit() and int(wanted) < len(found):
            return found[int(wanted)]
        for pair, name in zip(found, names, strict=True):
            if wanted.lower() in name.lower():
                return pair
        listing = "; ".join(f"{i}: {n}" for i, n in enumerate(names))
        raise ExecutorError(f"{DEVICE_ENV}={wanted!r} matches no OpenCL device ({listing})")
    gpus = [(p, d) for p, d in found if d.type & cl.device_type.GPU]
    return (gpus or found)[0]


def available(spec: TargetSpec) -> tuple[bool, str]:
    """Whether an OpenCL device can run the kernels here, and which (or why not)."""
    try:
        import pyopencl  # noqa: F401
    except ImportError:
        return False, "pyopencl is not installed (pip install pyopencl)"
    try:
        platform, device = pick_device()
    except ExecutorError as e:
        return False, str(e)
    fp16 = "fp16" if has_fp16(device) else "no fp16: use --quantization q4f32_1"
    version = " ".join(device.version.split()[:2])  # PoCL appends a long build string
    note = f"{device.name.strip()} ({platform.name.strip()}, {version}; {fp16})"
    if spec.limits and device.max_work_group_size < spec.limits.max_invocations:
        note += f"; workgroups of at most {device.max_work_group_size} threads"
    return True, note


def executor(plan: Plan, kernels: Path | Mapping[str, dict], spec: TargetSpec, **options: Any
             ) -> OpenCLExecutor:  # fmt: skip
    return OpenCLExecutor(plan, kernels, spec)


def device_info(spec: TargetSpec, **options: Any) -> dict[str, Any]:
    platform, device = pick_device()
    limits = {k: int(getattr(device, k)) for k in ("max_work_group_size", "local_mem_size",
              "max_mem_alloc_size", "global_mem_size", "max_compute_units")}  # fmt: skip
    return {"device": f"{device.name.strip()} ({platform.name.strip()})", "limits": limits,
            "features": ["fp16"] * has_fp16(device)}  # fmt: skip
