"""The cuda target: kernels compiled to PTX by NVRTC on any machine, run where an NVIDIA GPU is.

A cuda artifact holds two files built from the same scheduled kernels:
- kernels_cuda.json: the records of targets/gpu.py, each with the CUDA source and the "ptx"
  that NVRTC made of it for ARCH, so every machine (CI included) proves that all kernels
  compile for CUDA;
- kernels_cuda.so: the TVM library that TVM's CUDA runtime runs (`CudaExecutor`).
NVRTC, the CCCL headers it needs and the CUDA runtime all come from pip (cuda-bindings,
nvidia-cuda-nvrtc, nvidia-cuda-cccl, nvidia-cuda-runtime): no CUDA toolkit, no nvcc.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tapml.errors import CompileError, ExecutorError
from tapml.plan import Plan

from .llvm import TvmRuntimeExecutor

ARCH = "sm_75"  # Turing, the oldest GPU that CUDA 13 supports: its PTX runs on every later one
INSTALL = "pip install cuda-bindings nvidia-cuda-nvrtc nvidia-cuda-cccl nvidia-cuda-runtime"


class CudaExecutor(TvmRuntimeExecutor):
    """The TVM runtime on the first CUDA GPU, running kernels_cuda.so."""

    def __init__(self, plan: Plan, library: Path):
        executes, why = available()
        if not executes:
            raise ExecutorError(
                f"no CUDA GPU on this machine: cuda kernels are compiled, not executed ({why})"
            )
        # A library compiled where no GPU was holds CUDA source: TVM compiles it on loading.
        use_nvrtc_for_tvm()
        super().__init__(plan, Path(library), "cuda")


def executor(plan: Plan, kernels: Path, spec: Any = None, **options: Any) -> CudaExecutor:
    return CudaExecutor(plan, kernels)


def available(spec: Any = None) -> tuple[bool, str]:
    """Whether this machine runs cuda kernels, and on which GPU (or why not)."""
    why_not = _load_cuda_runtime()
    if why_not:
        return False, why_not
    import tvm

    device = tvm.cuda(0)
    if not device.exist:
        return False, "the CUDA runtime sees no GPU"
    return True, f"{device.device_name} (sm_{_sm(device)}) through TVM's CUDA runtime"


def build(kernels: dict[str, Any], target: Any, spec: Any, path: Path, progress: bool = False
          ) -> None:  # fmt: skip
    """Records with PTX into `path` (kernels_cuda.json), the TVM library beside it (.so)."""
    from tqdm import tqdm

    from .gpu import compile_records_and_modules
    from .llvm import build_library
    from .records import write_records

    records, modules = compile_records_and_modules(kernels, target, spec, progress)
    arch = "compute_" + str(target.attrs.get("arch", ARCH)).removeprefix("sm_")
    # ~2 s a kernel, half of it NVRTC parsing the CCCL headers; NVRTC is thread-safe and lets
    # go of the GIL, so the kernels compile on every core
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        jobs = {name: pool.submit(nvrtc_compile, record["source"], arch, name)
                for name, record in records.items()}  # fmt: skip
        bar = tqdm(jobs.items(), desc=f"NVRTC: cuda kernels to PTX ({arch})", unit="kernel",
                   disable=not progress)  # fmt: skip
        for name, job in bar:
            ptx = job.result().rstrip(b"\0").decode()
            record = records[name]
            for d in record["dispatches"]:
                if f".visible .entry {d['entry']}(" not in ptx:
                    raise CompileError(f"kernel {name}: NVRTC's PTX has no entry {d['entry']}")
            record["ptx"] = ptx
    # The library first: a kernels file on disk means the artifact's kernels are complete.
    build_library(modules, target, path.with_suffix(".so"))
    write_records(records, spec.name, str(target), path)


def nvrtc_compile(source: str, arch: str, name: str = "kernels") -> bytes:
    """PTX (arch "compute_XY") or cubin (arch "sm_XY") of CUDA source, made by NVRTC.

    PTX comes back NUL-terminated, as the CUDA driver wants it. A failure raises CompileError
    with NVRTC's log.
    """
    nvrtc = _nvrtc()
    ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    if err != ok:
        raise CompileError(f"NVRTC cannot take kernel {name}: {err.name}")
    try:
        options = [f"--gpu-architecture={arch}".encode(), b"-default-device"]
        options += [b"-I" + d.encode() for d in _include_dirs()]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if err != ok:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = bytearray(size)
            nvrtc.nvrtcGetProgramLog(prog, log)
            text = log.rstrip(b"\0").decode(errors="replace")
            raise CompileError(
                f"NVRTC cannot compile kernel {name} for {arch} ({err.name}):\n{text[:4000]}"
            )
        get_size, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if arch.startswith("sm_")
                         else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))  # fmt: skip
        _, size = get_size(prog)
        binary = bytearray(size)
        get(prog, binary)
        return bytes(binary)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def cached_nvrtc_compile(source: str, arch: str) -> bytes:
    """`nvrtc_compile`'s output, kept in the cache root under a hash of the source, the
    architecture and NVRTC's version: TVM compiles a library's CUDA source at every load, some
    1 s a kernel, NVRTC parsing the same headers each time."""
    import hashlib

    from tapml.cache import cache_root
    from tapml.fileio import write_atomic

    _, major, minor = _nvrtc().nvrtcVersion()
    key = hashlib.sha256(f"{arch}\0{major}.{minor}\0{source}".encode()).hexdigest()
    path = cache_root() / CUDA_CACHE / f"{key}.{'cubin' if arch.startswith('sm_') else 'ptx'}"
    try:
        return path.read_bytes()
    except OSError:
        pass
    binary = nvrtc_compile(source, arch)
    try:
        write_atomic(path, binary)
    except OSError:  # a read-only cache: compiled again next time
        pass
    return binary


CUDA_CACHE = "cuda"  # under the cache root: NVRTC's output by content
_registered = False


def use_nvrtc_for_tvm() -> None:
    """Point TVM's CUDA compile callback at `nvrtc_compile` (TVM's own wants a CUDA toolkit).

    TVM calls it when it makes a CUDA module where its CUDA runtime is loaded, and when it
    loads a library holding CUDA source: it gets a cubin for this machine's GPU (a cubin needs
    no PTX JIT, which a driver older than NVRTC refuses), or PTX where there is no GPU.
    """
    global _registered
    if _registered:
        return
    import tvm  # noqa: F401  (TVM registers its own callback on import: ours must come after)
    import tvm_ffi

    def compile_cuda(code: str, *_target) -> bytes:
        device = tvm.cuda(0)
        # no GPU: portable PTX (a cubin would be for one GPU generation only)
        arch = f"sm_{_sm(device)}" if device.exist else ARCH.replace("sm_", "compute_")
        return cached_nvrtc_compile(code, arch)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    _registered = True


def _sm(device) -> str:
    return device.compute_version.replace(".", "")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise CompileError(
            f"compiling cuda kernels needs NVRTC from pip: {INSTALL} (scripts/setup.sh does)"
        ) from e
    try:
        nvrtc.nvrtcVersion()
    except Exception as e:  # cuda-bindings raises RuntimeError when libnvrtc cannot load
        raise CompileError(f"NVRTC cannot load ({e}): {INSTALL}") from e
    return nvrtc


def _include_dirs() -> list[str]:
    """The headers TVM's CUDA source includes under NVRTC: CCCL's (cuda/std/cstdint, ...) and
    the CUDA runtime's (cuda_fp16.h)."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError as e:
        raise CompileError(f"NVRTC's headers cannot be found without cuda-pathfinder: {INSTALL}"
                           ) from e  # fmt: skip
    dirs = []
    for package, libname in [("nvidia-cuda-cccl", "cccl"), ("nvidia-cuda-runtime", "cudart")]:
        found = find_nvidia_header_directory(libname)
        if found is None:
            raise CompileError(f"NVRTC needs the headers of {package}: {INSTALL}")
        dirs.append(found)
    return dirs


def _load_cuda_runtime() -> str | None:
    """Load TVM's CUDA runtime plugin, its libcudart taken from pip; None, or why it fails.

    `import tvm` tries this itself, and fails quietly where libcudart.so.13 is not on the
    loader's path (a pip install puts it in site-packages) or no NVIDIA driver is installed.
    """
    import tvm
    import tvm_ffi

    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return None
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("cudart")  # RTLD_GLOBAL: the plugin's libcudart.so.13
    except Exception:  # noqa: BLE001 - none from pip: the system's may still be found
        pass
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda", mode="RTLD_LOCAL",
                        extra_lib_paths=[Path(tvm.__file__).parent / "lib"])  # fmt: skip
    except (OSError, RuntimeError) as e:
        if "libcuda.so" in str(e):
            return "no NVIDIA driver here (libcuda.so.1); kernels compile to PTX all the same"
        return f"TVM's CUDA runtime cannot load: {e}"
    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is None:
        return "TVM's CUDA runtime loaded but registered no CUDA device"
    return None
