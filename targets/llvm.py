"""The llvm target: kernels compiled to a shared library for this CPU, run by the TVM runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tapml.errors import ExecutorError
from tapml.plan import Plan

from .executor import Executor


class LlvmExecutor(Executor):
    name = "llvm"

    def __init__(self, plan: Plan, library: Path):
        import tvm

        self._tvm = tvm
        self._device = tvm.cpu()
        try:
            self._lib = tvm.runtime.load_module(str(library))
        except Exception as e:  # TVM raises its own error types for unreadable libraries
            raise ExecutorError(f"cannot load kernel library {library}: {e}") from e
        self._kernels: dict[str, Any] = {}
        for kernel in plan.kernels:
            try:
                self._kernels[kernel] = self._lib[kernel]
            except Exception as e:
                raise ExecutorError(f"{library} has no kernel {kernel!r}") from e
        super().__init__(plan)

    def _alloc(self, nbytes: int) -> Any:
        return self._tvm.runtime.empty((max(nbytes, 1),), "uint8", self._device)

    def _view(self, base: Any, shape: list[int], dtype: str) -> Any:
        return base._create_view(shape, dtype)

    def _upload(self, buffer: Any, array: np.ndarray) -> None:
        buffer.copyfrom(array)

    def _download(self, buffer: Any) -> np.ndarray:
        return buffer.numpy()

    def _launch(self, kernel: str, args: list[Any]) -> None:
        self._kernels[kernel](*args)


def build(kernels: dict[str, Any], target: Any, path: Path, progress: bool = False) -> None:
    """Schedule and compile each kernel for the CPU, then link them into one library."""
    import tvm
    from tqdm import tqdm

    from tapml.errors import CompileError
    from tapml.fileio import atomic_path

    from .llvm_schedules import schedule

    modules = []
    bar = tqdm(kernels.items(), desc="compiling kernels", unit="kernel", disable=not progress)
    for name, func in bar:
        mod = tvm.IRModule({name: func})
        try:
            mod = schedule(mod, target)
            modules.append(tvm.compile(mod, target=target).mod)
        except Exception as e:
            raise CompileError(f"kernel {name} failed to compile for {target}: {e}") from e
    lib = modules[0]
    for m in modules[1:]:
        lib.import_module(m)
    with atomic_path(path) as tmp:
        lib.export_library(str(tmp))
