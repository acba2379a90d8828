"""Targets and backends: one declarative spec each.

`TARGETS` is the registry every command's choices come from: a target says how to compile
(TVM target kind and options, the limits kernels must fit). `BACKENDS` says how compiled
kernels run: each backend names the targets it runs, whether its kernels are a native library,
and the module under tapml.targets that checks whether it can run here (`available`), builds
an executor from kernels (`executor`) and describes its device (`device_info`, optional).
Local engines and the device agent both go through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tapml.errors import CompileError, TapmlError

MiB = 1 << 20
# target options that are tapml's, not TVM's: how llvm computes prefill's and decode's matmuls
# over quantized weights (decode's: those of one row, prefill's last-row logits included).
# int8 activations as llama.cpp's (prefill 2-3x faster, decode 1.3x; logits about 1% off
# float32's) by default ("auto") where the CPU has AVX-512 VNNI, float32 elsewhere; float32 or
# int8 when asked
INT8_STAGES = ("prefill", "decode")
INT8_CHOICES = ("auto", "float32", "int8")


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
    limits: Limits | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # the KV cache's dtype where it is not the activations': float16 halves what attention
    # reads, but every target that replays a suite or takes offloaded kernels must hold it too
    kv_dtype: str | None = None
    # prompts of at most a quarter chunk run token by token through decode: where compute
    # dominates (a CPU) a chunk's prefill costs what some ten decode steps do (SmolLM2, 2
    # threads: 48 ms, one step 4.5 ms); on a GPU a step costs nearly what a chunk does
    decode_short_prompts: bool = False

    def kv_cache(self, quantization: str) -> str:
        """The KV cache dtype this target compiles `quantization` with by default."""
        from tapml.quantization import get_quantization

        return self.kv_dtype or get_quantization(quantization).dtype

    def resolved_options(self, overrides: dict[str, str] | None = None) -> dict[str, Any]:
        """The target's options (TVM's, and tapml's `prefill`), with machine-dependent
        defaults filled in."""
        options = dict(self.options)
        if self.kind == "llvm":
            from .llvm import host_cpu

            # "native" silently falls back to a generic CPU: always name the model.
            options["mcpu"] = host_cpu()
        if self.limits is not None:
            options["max_num_threads"] = self.limits.max_invocations
        options.update(overrides or {})
        for stage in INT8_STAGES:
            if options.get(stage) == INT8_CHOICES[0]:
                del options[stage]  # the default: one artifact, however it is asked for
            choice = options.get(stage)
            if choice is not None and (self.kind != "llvm" or choice not in INT8_CHOICES):
                raise TapmlError(f"--target-option {stage}={choice}: the llvm target takes "
                                 f"{stage}=auto (the default), {stage}=float32 or {stage}=int8")
        return options

    def reference_options(self) -> dict[str, str]:
        """The target options of a run other targets are compared with (a carving source, an
        offload's source, a replay): float32 arithmetic throughout, as every target computes."""
        return dict.fromkeys(INT8_STAGES, "float32") if self.kind == "llvm" else {}

    def tvm_target(self, overrides: dict[str, str] | None = None):
        import tvm

        resolved = self.resolved_options(overrides)
        options = {"kind": self.kind,
                   **{k: v for k, v in resolved.items() if k not in INT8_STAGES}}  # fmt: skip
        if self.kind != "llvm":
            options["host"] = {"kind": "llvm"}
        if self.kind == "cuda":
            from .cuda import use_nvrtc_for_tvm

            use_nvrtc_for_tvm()  # TVM's CUDA codegen compiles at once where its runtime is loaded
        return tvm.target.Target(options)


TARGETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in [
        TargetSpec(
            "llvm", "this machine's CPU, through LLVM and the TVM runtime",
            kind="llvm", f16=False, kernels="kernels_llvm.so",
            kv_dtype="float16",  # what llama.cpp keeps too; CPUs convert it in one instruction
            decode_short_prompts=True,
        ),
        TargetSpec(
            "webgpu", "WGSL within WebGPU's default limits, so any browser runs it (wgpu here)",
            kind="webgpu", f16=False, kernels="kernels_webgpu.json",
            limits=Limits(256, 16 * 1024, 8, 128 * MiB),
        ),
        TargetSpec(
            "vulkan", "WGSL within Vulkan-class limits, run by wgpu on its Vulkan backend",
            kind="webgpu", f16=False, kernels="kernels_vulkan.json",
            limits=Limits(1024, 32 * 1024, 16, 1024 * MiB),
        ),
        TargetSpec(
            "opencl", "OpenCL C for phones' GPUs (the Android target's kernels)",
            kind="opencl", f16=False, kernels="kernels_opencl.json",
            limits=Limits(256, 32 * 1024, 64, 256 * MiB),
        ),
        # metal and cuda: records (MSL; CUDA source + PTX) in the .json, and beside it a TVM
        # library (.so) that the TVM runtime executor of targets/llvm.py runs on the GPU.
        TargetSpec(
            "metal", "Metal Shading Language for Apple GPUs (runs on a Mac only)",
            kind="metal", f16=True, kernels="kernels_metal.json",
            limits=Limits(1024, 32 * 1024, 31, 1024 * MiB),
            # Apple silicon: 32-wide SIMD groups, 1024 threads per threadgroup
            options={"thread_warp_size": 32, "max_threads_per_block": 1024,
                     "max_shared_memory_per_block": 32 * 1024},
        ),
        TargetSpec(
            "cuda", "CUDA for NVIDIA GPUs (PTX from NVRTC; runs where a GPU is)",
            kind="cuda", f16=True, kernels="kernels_cuda.json",
            limits=Limits(1024, 48 * 1024, 64, 4096 * MiB),
            # the same code whatever GPU the compiling machine has (or none): Turing and later
            options={"arch": "sm_75", "max_shared_memory_per_block": 48 * 1024},
        ),
    ]
}  # fmt: skip


def binding_limit() -> int:
    """The smallest per-binding limit of any target. Weights are split to fit it whatever the
    target (tapml.nn.bindings), so that every target runs the same plan: a suite carved on
    llvm replays on WebGPU, and kernels offload between any two targets."""
    return min(spec.limits.max_binding_bytes for spec in TARGETS.values() if spec.limits)


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise TapmlError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]


@dataclass(frozen=True)
class Backend:
    """A way to run compiled kernels on a device (see the module docstring)."""

    name: str
    targets: tuple[str, ...]  # whose kernels it runs
    module: str  # under tapml.targets
    native: bool  # its kernels are a native library (a .so), which can do anything on the device

    def _module(self):
        return importlib.import_module(f"tapml.targets.{self.module}")

    def available(self, spec: TargetSpec) -> tuple[bool, str]:
        """Whether this machine can run `spec`'s kernels, and on what (or why not)."""
        try:
            module = self._module()
        except ImportError as e:
            return False, f"its executor cannot load: {e}"
        return module.available(spec)

    def kernels_file(self, artifact_dir: Path, spec: TargetSpec) -> Path:
        """The file of a compiled artifact this backend runs: the kernel records, or for a
        native backend the TVM library beside them."""
        path = Path(artifact_dir) / spec.kernels
        return path.with_suffix(".so") if self.native else path

    def executor(self, plan, kernels: Any, spec: TargetSpec, **options: Any):
        """An executor of `plan` from its kernels: a kernels file or parsed kernel records,
        or a native library's path."""
        return self._module().executor(plan, kernels, spec, **options)

    def device_info(self, spec: TargetSpec, **options: Any) -> dict[str, Any]:
        """The device this backend runs on here, its limits and features; an error where it
        has none."""
        from tapml.errors import DeviceError

        module = self._module()
        if hasattr(module, "device_info"):
            return module.device_info(spec, **options)
        executes, why = module.available(spec)
        if not executes:
            raise DeviceError(f"the {self.name} backend cannot run here: {why}")
        return {"device": why, "limits": {}, "features": []}


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend("llvm", ("llvm",), "llvm", native=True),
        Backend("wgpu", ("webgpu", "vulkan"), "webgpu", native=False),
        Backend("opencl", ("opencl",), "opencl", native=False),
        Backend("metal", ("metal",), "llvm", native=True),  # TVM's Metal runtime
        Backend("cuda", ("cuda",), "cuda", native=True),
    ]
}


def backend_for(target: str) -> Backend:
    """The backend that runs `target`'s kernels."""
    get_target(target)
    return next(b for b in BACKENDS.values() if target in b.targets)


def build_kernels(kernels: dict, plan, options, path: Path, progress: bool = False) -> None:
    """Compile the plan's kernels (name -> PrimFunc) for `options.target` into `path`.

    cuda also writes the TVM library beside `path` (kernels_cuda.so), and so does metal on a
    Mac (kernels_metal.so); elsewhere metal kernels are generated only.
    """
    spec = get_target(options.target)
    target = spec.tvm_target(options.target_options)
    if spec.kind == "llvm":
        from .llvm import build, int8_matmuls

        # options.target_options are resolved already (CompileOptions.resolve)
        build(kernels, target, path, progress,
              int8=int8_matmuls(target, options.target_options, plan))  # fmt: skip
        return
    check_bindings(plan, spec)
    if spec.kind == "cuda":
        from .cuda import build

        build(kernels, target, spec, path, progress)
        return
    import sys

    from .gpu import compile_records, compile_records_and_modules
    from .records import write_records

    if spec.kind == "metal" and sys.platform == "darwin":
        from .llvm import build_library

        records, modules = compile_records_and_modules(kernels, target, spec, progress)
        # MSL source inside: the Metal runtime compiles it when the library loads.
        build_library(modules, target, path.with_suffix(".so"))
    else:
        records = compile_records(kernels, target, spec, progress)
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
    """An executor here for `target` with the kernels compiled into `artifact_dir`."""
    from tapml.errors import ExecutorError

    spec, backend = get_target(target), backend_for(target)
    executes, why = backend.available(spec)
    if not executes:
        raise ExecutorError(f"{target} kernels are generated, not executed, on this machine: {why}")
    kernels = backend.kernels_file(artifact_dir, spec)
    if not kernels.is_file():
        where = " on a Mac" if target == "metal" else ""
        raise ExecutorError(f"{artifact_dir} has no {kernels.name}: compile the model for "
                            f"{target}{where}")  # fmt: skip
    return backend.executor(plan, kernels, spec)


def executes_here(spec: TargetSpec) -> tuple[bool, str]:
    """Whether this machine can run `spec`'s kernels, and the device (or the reason not)."""
    return backend_for(spec.name).available(spec)
