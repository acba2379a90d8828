"""The TVM runtime executor, and the llvm target it runs on this machine's CPU.

`TvmRuntimeExecutor` runs a kernel library built by `tvm.compile` on one TVM device: the CPU
for llvm, the GPU for cuda (targets/cuda.py) and metal. `build` compiles the llvm target's
kernels; `build_library` links a GPU target's scheduled kernels into a library of host code
with the device code inside it.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tapml.errors import ExecutorError, TapmlError
from tapml.plan import Plan, evaluate

from . import tvm_runtime
from .executor import Executor


class TvmRuntimeExecutor(Executor):
    """Runs the plan through a TVM kernel library on `device` ("cpu", "cuda" or "metal")."""

    name = "tvm"

    def __init__(self, plan: Plan, library: Path, device: str = "cpu"):
        library = Path(library)
        self.name = "llvm" if device == "cpu" else device
        self._device, self._lib = self._open(library, device)
        # numpy reads and writes this process's CPU tensors in place (DLPack): TVM's own copies
        # cost some 40 us each after a decode step's kernels, 3% of a step
        self._in_place = self._device.dlpack_device_type() == 1  # kDLCPU, not a remote one
        self._kernels: dict[str, Any] = {}
        self._prepared: dict[Any, tuple] = {}
        for kernel in plan.kernels:
            try:
                self._kernels[kernel] = self._lib[kernel]
            except Exception as e:
                raise ExecutorError(f"{library} has no kernel {kernel!r}") from e
        super().__init__(plan)

    def _open(self, library: Path, device: str) -> tuple[Any, Any]:
        """The TVM device to run on and the loaded library (a TVM RPC session's, remotely)."""
        tvm_device = tvm_runtime.device(device)
        if not tvm_runtime.device_exists(tvm_device):
            raise ExecutorError(f"no {device} device on this machine to run {library.name}")
        try:
            return tvm_device, tvm_runtime.load_module(library)
        except Exception as e:  # TVM raises its own error types for unreadable libraries
            raise ExecutorError(f"cannot load kernel library {library}: {e}") from e

    def _alloc(self, nbytes: int) -> Any:
        return tvm_runtime.empty(max(nbytes, 1), self._device)

    def _view(self, base: Any, shape: list[int], dtype: str) -> Any:
        return tvm_runtime.view(base, shape, dtype)

    def _upload(self, buffer: Any, array: np.ndarray) -> None:
        if self._in_place:
            np.copyto(np.from_dlpack(buffer), array)
        else:
            buffer.copyfrom(array)

    def _download(self, buffer: Any) -> np.ndarray:
        return np.from_dlpack(buffer).copy() if self._in_place else buffer.numpy()

    def _host_array(self, buffer: Any) -> np.ndarray | None:
        return np.from_dlpack(buffer) if self._in_place else None

    @property
    def maps_weights(self) -> bool:
        return self._in_place

    def _bind(self, array: np.ndarray) -> Any:
        self._prepared.clear()  # prepared calls hold the buffers they were given
        return tvm_runtime.from_dlpack(array)

    def _launch(self, kernel: str, args: list[Any]) -> None:
        self._kernels[kernel](*args)

    def _sync(self) -> None:
        # GPU launches are asynchronous; a CPU device's sync returns at once.
        tvm_runtime.sync(self._device)

    def run(self, function: str, scalars: Mapping[str, int], inputs: Mapping[str, np.ndarray],
            interrupt: Callable[[], None] | None = None) -> np.ndarray:  # fmt: skip
        """Run one entry point; each call's kernel and buffers are looked up once, at its first
        run, and each distinct scalar expression is evaluated once per run (a decode step
        passes `pos` to some 200 calls)."""
        f = self.begin_run(function, scalars, inputs)
        if function not in self._prepared:
            self._prepared[function] = self._prepare(f["calls"])
        self._launch_prepared(self._prepared[function], scalars, interrupt)
        return self.download(f["outputs"][0])

    def advance(self, function: str, scalars: Mapping[str, int],
                inputs: Mapping[str, np.ndarray]) -> None:  # fmt: skip
        """Run only the calls the entry point's state depends on (`Plan.state_calls`)."""
        f = self.begin_run(function, scalars, inputs)
        key = (function, "state")
        if key not in self._prepared:
            calls = f["calls"]
            self._prepared[key] = self._prepare([calls[i] for i in self.plan.state_calls(function)])
        self._launch_prepared(self._prepared[key], scalars, None)

    def _launch_prepared(self, prepared: tuple, scalars: Mapping[str, int], interrupt) -> None:
        """Launch `_prepare`'d calls, their scalar expressions evaluated once."""
        prepared, expressions = prepared
        values = {k: evaluate(expr, scalars) for k, expr in expressions.items()}
        for kernel, args, slots in prepared:
            if interrupt is not None:
                interrupt()
            for index, k in slots:
                args[index] = values[k]
            kernel(*args)

    def _prepare(self, calls: list[dict[str, Any]]) -> tuple[list, dict[str, Any]]:
        """([(kernel, its argument list, [(index, key of its scalar expression)])],
        {key: scalar expression}); constant scalars are filled in here."""
        prepared, expressions = [], {}
        for call in calls:
            args, slots = [], []
            for index, a in enumerate(call["args"]):
                if "buffer" in a:
                    args.append(self.buffers[a["buffer"]])
                elif isinstance(a["scalar"], (int, float)):
                    args.append(a["scalar"])
                else:
                    key = json.dumps(a["scalar"], sort_keys=True)
                    expressions[key] = a["scalar"]
                    slots.append((index, key))
                    args.append(None)
            prepared.append((self._kernels[call["kernel"]], args, slots))
        return prepared, expressions


class LlvmExecutor(TvmRuntimeExecutor):
    """The llvm target's executor: the TVM runtime on the CPU, its buffers in one block of
    `HostMemory`."""

    allocates_zeroed = True  # an anonymous mapping of its own

    def __init__(self, plan: Plan, library: Path):
        self._memory = HostMemory(sum(HostMemory.rounded(n) for n in plan.allocations()))
        super().__init__(plan, library, "cpu")

    def _alloc(self, nbytes: int) -> Any:
        return self._memory.take(nbytes)


# -- memory --------------------------------------------------------------------------
class HostMemory:
    """A block of this process's memory that CPU tensors are carved from: an anonymous
    mapping, zeroed by the OS and resident only where touched.

    Not in huge pages: where memory is fragmented (a page cache full of model files) the OS
    compacts memory to give each 2 MiB page at its first touch, and reading Qwen2.5-0.5B's
    weights into huge pages took 1.1 to 1.5 s against 0.7 to 0.9 s; decode was as fast either
    way (SmolLM2 and Qwen2.5, 2 threads, within 3%).
    """

    PAGE = 4096  # each tensor starts at a page (the kernels need 64-byte alignment)

    def __init__(self, nbytes: int):
        self._map = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._free = np.frombuffer(self._map, np.uint8)[:nbytes]

    @classmethod
    def rounded(cls, nbytes: int) -> int:
        """What `take(nbytes)` uses of the block."""
        return -(-max(nbytes, 1) // cls.PAGE) * cls.PAGE

    def take(self, nbytes: int) -> Any:
        """The next `nbytes` of the block as a uint8 CPU tensor."""
        size = self.rounded(nbytes)
        if size > len(self._free):
            raise ExecutorError(f"host memory block has {len(self._free)} bytes left, not {size}")
        block, self._free = self._free[:size], self._free[size:]
        return tvm_runtime.from_dlpack(block[: max(nbytes, 1)])


def int8_matmuls(target: Any, options: dict[str, str], plan: Any) -> frozenset[str]:
    """The stages ("prefill", "decode") whose matmuls over quantized weights take int8
    activations: those asked for (`--target-option decode=int8`, which needs AVX-512 VNNI),
    and by default (`auto`) a causal LM's where the CPU has VNNI."""
    from tapml.errors import CompileError

    from . import INT8_STAGES
    from .llvm_schedules.int8 import has_vnni

    stages = set()
    for stage in INT8_STAGES:
        choice = options.get(stage, "auto")
        if choice == "int8" and not has_vnni(target):
            raise CompileError(f"{stage}=int8 needs a CPU with AVX-512 VNNI; "
                               f"{target.attrs.get('mcpu')} has none")  # fmt: skip
        if choice == "int8" or (choice == "auto" and plan.task.get("kind") == "causal_lm"
                                and has_vnni(target)):  # fmt: skip
            stages.add(stage)
    return frozenset(stages)


def build(kernels: dict[str, Any], target: Any, path: Path, progress: bool = False,
          int8: frozenset[str] = frozenset()) -> None:  # fmt: skip
    """Schedule and compile each kernel for the CPU (on every core), then link them into one
    library; `int8`: the stages whose matmuls over quantized weights are in int8
    (`int8_matmuls`)."""
    import tempfile

    from tvm.support import cc

    from tapml.fileio import atomic_path

    from .workers import compile_each

    with tempfile.TemporaryDirectory(prefix="tapml-kernels-") as objects:
        compiled = compile_each(kernel_object, kernels, target, int8, objects,
                                desc="compiling llvm kernels", progress=progress)  # fmt: skip
        # The library's functions are found by symbol: no module tree to pack beside them
        with atomic_path(path) as tmp:
            cc.create_shared(str(tmp), list(compiled.values()))


def kernel_object(name: str, func: Any, target: Any, int8: frozenset[str], directory: str
                  ) -> str:  # fmt: skip
    """The object file (in `directory`) of one kernel scheduled and compiled for the CPU."""
    import tvm

    from .llvm_schedules import schedule

    mod = schedule(tvm.IRModule({name: func}), target, int8)
    path = os.path.join(directory, f"{name}.o")
    tvm.compile(mod, target=target).mod.write_to_file(path)
    return path


def build_library(modules: dict[str, Any], target: Any, path: Path) -> None:
    """Compile a GPU target's scheduled kernels (name -> IRModule) into one TVM library.

    One module for all kernels: one host object and one device module to link and load.
    """
    import tvm

    from tapml.errors import CompileError
    from tapml.fileio import atomic_path

    merged = tvm.IRModule({name: mod[name] for name, mod in modules.items()})
    try:
        lib = tvm.compile(merged, target=target).mod
    except Exception as e:
        raise CompileError(f"the {target.kind.name} kernel library failed to build: {e}") from e
    with atomic_path(path) as tmp:
        lib.export_library(str(tmp))


def executor(plan: Plan, kernels: Path, spec, **options: Any) -> TvmRuntimeExecutor:
    """The llvm target's executor, or TVM's Metal runtime's, over a kernel library."""
    if spec.kind == "llvm":
        return LlvmExecutor(plan, kernels)
    return TvmRuntimeExecutor(plan, kernels, spec.kind)


def available(spec) -> tuple[bool, str]:
    """Whether this machine runs `spec`'s kernels through the TVM runtime, and on what (or why
    not): the CPU always runs llvm kernels; metal kernels need a Mac with a Metal GPU."""
    if spec.kind == "metal":
        if sys.platform != "darwin":
            return False, "Metal runs on macOS only (bench/metal_check.sh runs it on a Mac)"
        import tvm

        if not tvm.metal(0).exist:
            return False, "this Mac has no Metal device that TVM's runtime can open"
        return True, f"{tvm.metal(0).device_name} through TVM's Metal runtime"
    return True, f"this CPU ({host_cpu()}) through the TVM runtime"


HOST_CPU_FILE = "host-cpu.json"


def host_cpu() -> str:
    """LLVM's name for this machine's CPU, the llvm target's `mcpu`.

    Asking LLVM loads TVM's compiler, which a run of a cached artifact otherwise never needs
    (the name is part of the cache key): the answer is remembered in the cache root per CPU
    model and feature flags, as /proc/cpuinfo gives them.
    """
    from tapml.cache import cache_root
    from tapml.fileio import write_atomic

    fingerprint = _cpu_fingerprint()
    store = cache_root() / HOST_CPU_FILE
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if fingerprint is not None and isinstance(known.get(fingerprint), str):
        return known[fingerprint]
    from tvm.target.codegen import llvm_get_system_cpu

    name = str(llvm_get_system_cpu())
    if fingerprint is not None:
        known[fingerprint] = name  # a cache root shared by a few machines knows each
        try:
            write_atomic(store, json.dumps(known).encode())
        except OSError:
            pass  # a read-only cache: ask LLVM again next time
    return name


def _cpu_fingerprint() -> str | None:
    """A hash of what describes this CPU to LLVM: its first processor's identity and feature
    lines in /proc/cpuinfo (None where there is none)."""
    import hashlib
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    first = text.split("\n\n", 1)[0]
    keys = ("vendor_id", "cpu family", "model", "model name", "flags", "Features",
            "CPU implementer", "CPU part")  # fmt: skip
    lines = [line for line in first.splitlines() if line.split(":")[0].strip() in keys]
    return hashlib.sha256("\n".join([platform.machine(), *lines]).encode()).hexdigest()[:16]


# -- threads -------------------------------------------------------------------------
def default_threads() -> int:
    """One thread per physical core this process may run on.

    TVM's own default is half the logical CPUs on x86 (it assumes SMT pairs): one thread on a
    2-core VM without SMT.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if cpus is None:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(path.read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores)


def tvm_threads() -> int:
    """The threads TVM's CPU thread pool runs kernels on (it starts the pool if need be)."""
    return int(tvm_runtime.function("runtime.NumThreads")())


def set_threads(threads: int | None = None) -> int:
    """Run TVM's CPU kernels on `threads` threads (default: one per physical core); returns
    the count read back from TVM.

    The pool reads TVM_NUM_THREADS once, when it starts; a pool that already runs can be
    narrowed but not widened.
    """
    threads = threads or default_threads()
    os.environ["TVM_NUM_THREADS"] = str(threads)
    if tvm_threads() != threads:
        # mode 1 (kBig): the pool's default, every worker on the fastest cores
        tvm_runtime.function("runtime.config_threadpool")(1, threads)
    actual = tvm_threads()
    if actual != threads:
        raise TapmlError(
            f"TVM's thread pool already runs {actual} threads and cannot grow to {threads}; "
            f"set TVM_NUM_THREADS={threads} before the first kernel runs (e.g. a fresh process)"
        )
    return actual


def use_threads(threads: int | None) -> None:
    """Before any kernel runs: `threads` CPU threads, else one per physical core unless the
    environment already sets TVM_NUM_THREADS."""
    if threads:
        set_threads(threads)
    elif "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(default_threads())
