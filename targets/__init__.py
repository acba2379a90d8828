"""Targets: one declarative spec each, and the executors that run a plan's kernels on them.

`TARGETS` is the registry every command's choices come from. A spec says how to compile
(TVM target kind and options, the limits kernels must fit) and how to run what was compiled
(which executor, and whether it can run on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tapml.errors import CompileError, TapmlError

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Per-dispatch limits a target's kernels must fit, whatever device runs them."""

    max_invocations: int  # threads per workgroup
    max_workgroup_storage: int  # bytes of shared memory per workgroup
    max_storage_buffers: int  # buffers bound to one dispatch
    max_binding_bytes: int  # bytes of one bound buffer


@dataclass(frozen=True)
class TargetSpec:
    """What tapml needs to know to compile for a target and to run what it compiled."""

    name: str
    description: str
    kind: str  # TVM target kind
    f16: bool  # f16 is native everywhere the target runs
    kernels: str  # file name of the compiled kernels inside an artifact
    executor: str | None  # module under tapml.targets that runs them; None: generated only
    limits: Limits | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # the KV cache's dtype where it is not the activations': float16 halves what attention
    # reads, but every target that replays a suite or takes offloaded kernels must hold it too
    kv_dtype: str | None = None

    def kv_cache(self, quantization: str) -> str:
        """The KV cache dtype this target compiles `quantization` with by default."""
        from tapml.quantization import get_quantization

        return self.kv_dtype or get_quantization(quantization).dtype

    def resolved_options(self, overrides: dict[str, str] | None = None) -> dict[str, Any]:
        """The TVM target options, with machine-dependent defaults filled in."""
        options = dict(self.options)
        if self.kind == "llvm":
            from tvm.target.codegen import llvm_get_system_cpu

            # "native" silently falls back to a generic CPU: always name the model.
            options["mcpu"] = llvm_get_system_cpu()
        if self.limits is not None:
            options["max_num_threads"] = self.limits.max_invocations
        options.update(overrides or {})
        return options

    def tvm_target(self, overrides: dict[str, str] | None = None):
        import tvm

        options = {"kind": self.kind, **self.resolved_options(overrides)}
        if self.kind != "llvm":
            options["host"] = {"kind": "llvm"}
        return tvm.target.Target(options)


TARGETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in [
        TargetSpec(
            "llvm", "this machine's CPU, through LLVM and the TVM runtime",
            kind="llvm", f16=False, kernels="kernels_llvm.so", executor="llvm",
            kv_dtype="float16",  # what llama.cpp keeps too; CPUs convert it in one instruction
        ),
        TargetSpec(
            "webgpu", "WGSL within WebGPU's default limits, so any browser runs it (wgpu here)",
            kind="webgpu", f16=False, kernels="kernels_webgpu.json", executor="webgpu",
            limits=Limits(256, 16 * 1024, 8, 128 * MiB),
        ),
        TargetSpec(
            "vulkan", "WGSL within Vulkan-class limits, run by wgpu on its Vulkan backend",
            kind="webgpu", f16=False, kernels="kernels_vulkan.json", executor="webgpu",
            limits=Limits(1024, 32 * 1024, 16, 1024 * MiB),
        ),
        TargetSpec(
            "opencl", "OpenCL C for phones' GPUs (the Android target's kernels)",
            kind="opencl", f16=False, kernels="kernels_opencl.json", executor="opencl",
            limits=Limits(256, 32 * 1024, 64, 256 * MiB),
        ),
        # metal and cuda: records (MSL; CUDA source + PTX) in the .json, and beside it a TVM
        # library (.so) that the TVM runtime executor of targets/llvm.py runs on the GPU.
        TargetSpec(
            "metal", "Metal Shading Language for Apple GPUs (runs on a Mac only)",
            kind="metal", f16=True, kernels="kernels_metal.json", executor="llvm",
            limits=Limits(1024, 32 * 1024, 31, 1024 * MiB),
            # Apple silicon: 32-wide SIMD groups, 1024 threads per threadgroup
            options={"thread_warp_size": 32, "max_threads_per_block": 1024,
                     "max_shared_memory_per_block": 32 * 1024},
        ),
        TargetSpec(
            "cuda", "CUDA for NVIDIA GPUs (PTX from NVRTC; runs where a GPU is)",
            kind="cuda", f16=True, kernels="kernels_cuda.json", executor="cuda",
            limits=Limits(1024, 48 * 1024, 64, 4096 * MiB),
            # the same code whatever GPU the compiling machine has (or none): Turing and later
            options={"arch": "sm_75", "max_shared_memory_per_block": 48 * 1024},
        ),
    ]
}  # fmt: skip


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise TapmlError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]


def build_kernels(kernels: dict, plan, options, path: Path, progress: bool = False) -> None:
    """Compile the plan's kernels (name -> PrimFunc) for `options.target` into `path`.

    cuda also writes the TVM library beside `path` (kernels_cuda.so), and so does metal on a
    Mac (kernels_metal.so); elsewhere metal kernels are generated only.
    """
    spec = get_target(options.target)
    target = spec.tvm_target(options.target_options)
    if spec.kind == "llvm":
        from .llvm import build

        build(kernels, target, path, progress)
        return
    check_bindings(plan, spec)
    if spec.kind == "cuda":
        from .cuda import build

        build(kernels, target, spec, path, progress)
        return
    import sys

    from .gpu import compile_records
    from .records import write_records

    records, modules = compile_records(kernels, target, spec, progress)
    if spec.kind == "metal" and sys.platform == "darwin":
        from .llvm import build_library

        # MSL source inside: the Metal runtime compiles it when the library loads.
        build_library(modules, target, path.with_suffix(".so"))
    write_records(records, spec.name, str(target), path)


def check_bindings(plan, spec: TargetSpec) -> None:
    """Refuse a plan that binds a buffer larger than the target lets one binding be."""
    limit = spec.limits.max_binding_bytes
    for fname, f in plan.functions.items():
        for call in f["calls"]:
            for arg in call["args"]:
                if "buffer" in arg and plan.nbytes(plan.root(arg["buffer"])) > limit:
                    raise CompileError(
                        f"{fname}: kernel {call['kernel']} binds {arg['buffer']} of "
                        f"{plan.nbytes(plan.root(arg['buffer'])) / MiB:.1f} MiB; {spec.name} "
                        f"allows {limit / MiB:.0f} MiB per binding (max_binding_bytes)"
                    )


def load_executor(target: str, plan, artifact_dir: Path):
    """An executor for `target` with the kernels compiled into `artifact_dir`."""
    spec = get_target(target)
    path = Path(artifact_dir) / spec.kernels
    if spec.executor == "cuda":
        from .cuda import CudaExecutor

        return CudaExecutor(plan, path.with_suffix(".so"))
    if spec.kind == "metal":
        from tapml.errors import ExecutorError

        from .llvm import TvmRuntimeExecutor, available

        executes, why = available(spec)
        if not executes:
            raise ExecutorError(
                f"metal kernels are generated, not executed, on this machine: {why}"
            )
        library = path.with_suffix(".so")
        if not library.is_file():
            raise ExecutorError(
                f"{artifact_dir} has no {library.name}: compile the model for metal on this Mac"
            )
        return TvmRuntimeExecutor(plan, library, "metal")
    if spec.executor == "llvm":
        from .llvm import LlvmExecutor

        return LlvmExecutor(plan, path)
    if spec.executor == "webgpu":
        from .webgpu import WebGPUExecutor

        return WebGPUExecutor(plan, path, spec)
    if spec.executor == "opencl":
        from .opencl import OpenCLExecutor

        return OpenCLExecutor(plan, path, spec)
    raise TapmlError(
        f"{spec.name} kernels are generated, not executed, on this machine: {spec.description}"
    )


def executes_here(spec: TargetSpec) -> tuple[bool, str]:
    """Whether this machine can run `spec`'s kernels, and the device (or the reason not)."""
    import importlib

    if spec.executor is None:
        return False, spec.description
    try:
        module = importlib.import_module(f"tapml.targets.{spec.executor}")
    except ImportError as e:
        return False, f"its executor cannot load: {e}"
    return module.available(spec)
