"""Run a small Relax module's `decode` and `prefill` entry points through the compiler's own
path: lowering, the plan, the target's kernels and its executor."""

from __future__ import annotations

from pathlib import Path

from tvm.relax.frontend import nn

from tapml.compiler import CompileOptions
from tapml.lower import extract_plan, fuse, kernel_functions
from tapml.targets import build_kernels, executes_here, get_target, load_executor

MODE = {"param_mode": "plain", "effect_mode": "none"}


def executor_for(module: nn.Module, specs: dict[str, dict], target: str, directory: Path):
    """An executor of `module`'s entry points (`specs`: entry point -> its inputs' specs)
    compiled for `target` into `directory`; its parameters are still to be loaded."""
    mod, named = module.export_tvm(spec={e: {**s, "$": MODE} for e, s in specs.items()})
    fused = fuse(mod, list(specs))
    task = {"kind": "kernels", **{e: {"function": e} for e in specs}}
    plan = extract_plan(fused, [n for n, _ in named], [], {}, task)
    kernels = {k: f for k, f in kernel_functions(fused).items() if k in plan.kernels}
    directory.mkdir(parents=True, exist_ok=True)
    options = CompileOptions.resolve(target)
    build_kernels(kernels, plan, options, directory / get_target(target).kernels)
    return load_executor(target, plan, directory)


def runs_here(target: str) -> tuple[bool, str]:
    return executes_here(get_target(target))
