"""Targets: one declarative spec each, and the executors that run a plan's kernels on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tapml.errors import TapmlError


@dataclass(frozen=True)
class TargetSpec:
    """What tapml needs to know to compile for a target and to run what it compiled."""

    name: str
    description: str
    kind: str  # TVM target kind
    f16: bool  # whether f16 arithmetic is native (decides the default quantization)
    library: str  # file name of the compiled kernels inside an artifact
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def default_quantization(self) -> str:
        return "q4f16_1" if self.f16 else "q4f32_1"

    def resolved_options(self, overrides: dict[str, str] | None = None) -> dict[str, Any]:
        """The TVM target options, with machine-dependent defaults filled in."""
        options = dict(self.options)
        if self.kind == "llvm":
            from tvm.target.codegen import llvm_get_system_cpu

            # "native" silently falls back to a generic CPU: always name the model.
            options["mcpu"] = llvm_get_system_cpu()
        options.update(overrides or {})
        return options

    def tvm_target(self, overrides: dict[str, str] | None = None):
        import tvm

        return tvm.target.Target({"kind": self.kind, **self.resolved_options(overrides)})


TARGETS: dict[str, TargetSpec] = {
    "llvm": TargetSpec(
        name="llvm",
        description="this machine's CPU, through LLVM and the TVM runtime",
        kind="llvm",
        f16=False,
        library="kernels_llvm.so",
    ),
}


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise TapmlError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]


def build_kernels(kernels: dict, options, path, progress: bool = False) -> None:
    """Compile the plan's kernels (name -> PrimFunc) for `options.target` into `path`."""
    spec = get_target(options.target)
    if spec.kind == "llvm":
        from .llvm import build

        build(kernels, spec.tvm_target(options.target_options), path, progress)
    else:  # pragma: no cover - every registered target has a builder
        raise TapmlError(f"no kernel builder for target {spec.name!r}")


def load_executor(target: str, plan, artifact_dir):
    """An executor for `target` with the kernels compiled into `artifact_dir`."""
    from pathlib import Path

    spec = get_target(target)
    if spec.kind == "llvm":
        from .llvm import LlvmExecutor

        return LlvmExecutor(plan, Path(artifact_dir) / spec.library)
    raise TapmlError(f"no executor for target {spec.name!r}")  # pragma: no cover
