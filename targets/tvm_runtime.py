"""TVM's runtime alone: what running a compiled kernel library needs, and nothing more.

`import tvm` loads TVM's compiler (a 250 MB library and some 400 Python modules), and its FFI
layer imports torch and ml_dtypes wherever they are installed: some 3 s and 400 MB before the
first kernel runs. Running a library needs only tvm_ffi and libtvm_runtime, loaded here with
torch and ml_dtypes kept out (tvm_ffi imports each only if it can, to speed up conversions
tapml does not use). A process that compiles later still imports tvm as usual: the same
libraries, loaded once.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from tapml.errors import ExecutorError

# imported by tvm_ffi when installed, used by nothing tapml runs (cuda.bindings: CUstream
# arguments; tapml's cuda target imports it itself, for NVRTC)
OPTIONAL_IMPORTS = ("torch", "ml_dtypes", "cuda.bindings")


@contextmanager
def _without(modules: tuple[str, ...]):
    """Make `import M` fail for each of `modules` not imported yet, until the block ends."""
    hidden = [m for m in modules if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # what the import system reads as absent
    try:
        yield
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


# iterations an idle CPU worker yields before it sleeps (TVM's default: 300,000, some 0.13 s
# here). Kernels of a step follow each other within microseconds and steps within a
# millisecond, so 10,000 (~4 ms) keeps the workers awake while a model runs, and a process
# that exits no longer waits out the spin of its workers (they see the exit only after it).
SPIN_COUNT = "10000"


@cache
def ffi() -> Any:
    """tvm_ffi, with TVM's runtime library loaded into it."""
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", SPIN_COUNT)  # read when the pool starts
    with _without(OPTIONAL_IMPORTS):
        import tvm_ffi
    from tvm_ffi.libinfo import load_lib_ctypes

    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ExecutorError("TVM is not installed: pip install apache-tvm")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=[lib_dir])
    return tvm_ffi


@cache
def function(name: str) -> Any:
    """A global function of TVM's runtime (looked up once: `sync` runs at every step)."""
    return ffi().get_global_func(name)


def device(kind: str, index: int = 0) -> Any:
    return ffi().device(kind, index)


def device_exists(dev: Any) -> bool:
    return function("runtime.GetDeviceAttr")(dev.dlpack_device_type(), dev.index, 0) != 0


def sync(dev: Any) -> None:
    function("runtime.Device_StreamSync")(dev, 0)  # 0: the default stream


def load_module(path: Path) -> Any:
    return ffi().load_module(str(path))


def empty(nbytes: int, dev: Any) -> Any:
    """A uint8 tensor of `nbytes` on `dev`."""
    tvm_ffi = ffi()
    return function("runtime.TVMTensorAllocWithScope")(
        tvm_ffi.Shape([nbytes]), tvm_ffi.dtype("uint8"), dev, None
    )


def view(base: Any, shape: list[int], dtype: str) -> Any:
    """A tensor of `shape` and `dtype` over the start of `base`'s memory."""
    return function("runtime.TVMTensorCreateView")(base, ffi().Shape(shape), dtype, 0)


def from_dlpack(array: Any) -> Any:
    return ffi().from_dlpack(array)
