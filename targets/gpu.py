"""Kernels for GPU-style targets: dlight schedules, device code, and launch records.

Each plan kernel becomes a record the executors interpret without TVM:

    {"schedule": RULES, "params": [names], "source": device code of the kernel (WGSL, OpenCL C,
     MSL or CUDA), "dispatches": [{"entry": device function, "args": [{"buffer": param index}
     | {"pod": dtype, "expr": EXPR}], "writable": [bool per buffer arg], "grid": [EXPR x3],
     "workgroup": [EXPR x3], "shared_bytes": int}], "ptx": PTX from NVRTC (cuda only)}

EXPR is the plan's scalar expression language over the kernel's scalar parameters, so an
executor evaluates launch dimensions from the call's scalars. Every dispatch is checked
against the target's limits, and a kernel over a limit is refused naming both.
"""

from __future__ import annotations

import json
import re
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from tapml.errors import CompileError
from tapml.lower import expr_to_json


# Rule lists tried in turn: the first that schedules and lowers a kernel wins. dlight's
# GEMV/Matmul rules can fail on unusual kernels; GeneralReduction and Fallback always apply.
# A kernel of many short sums (a convolution: a million outputs of 27 products each) goes to
# Fallback's thread per output before the reduction rules, which would give each output a
# workgroup that sums it across threads (a 640x640 detector ran 15x slower so).
class ThreadPerOutput(GPUScheduleRule):
    """A sum, alone or followed by elementwise blocks (a convolution with its bias and
    activation, its padding computed where it is read): each thread makes one output, its sum
    in a register, then the elementwise chain. (dlight's Fallback gives each block its own
    loop nest, which leaves the sums in device memory between launches.)"""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> Any:
        from tvm import s_tir

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(_inline_producers(func))
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) == 1:  # the sum writes the output: sum in a register, then store
            blocks = [blocks[0], sch.cache_write(blocks[0], 0, "local")]
        if len(blocks) != 2:
            return None
        total, output = blocks
        kinds = [{int(v.iter_type) for v in sch.get(b).iter_vars} for b in blocks]
        if tirx.IterVar.CommReduce not in kinds[0] or kinds[1] != {tirx.IterVar.DataPar}:
            return None
        block_x, thread_x = sch.split(sch.fuse(*sch.get_loops(output)),
                                      [None, dl.base.max_threads_per_block(target)])  # fmt: skip
        sch.bind(block_x, "blockIdx.x")
        sch.bind(thread_x, "threadIdx.x")
        sch.compute_at(total, thread_x)
        sch.set_scope(total, 0, "local")
        return sch


# A padded convolution skips dlight's Matmul: its tiles load the input before checking the
# padding's bounds (the check becomes a select of the loaded value), reading before the
# buffer's start at the image's top rows, which PoCL's OpenCL faults on.
SPATIAL_SETS: list[tuple[str, Any]] = [
    ("matmul+gemv+spatial", lambda: [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
                                     ThreadPerOutput(), dl.gpu.Fallback()]),
    ("spatial", lambda: [ThreadPerOutput(), dl.gpu.Fallback()]),
]  # fmt: skip
MANY_OUTPUTS, SHORT_SUM = 1 << 14, 1 << 11
RULE_SETS: list[tuple[str, Any]] = [
    ("matmul+gemv+reduction", lambda: [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
                                       dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                       dl.gpu.Fallback()]),
    ("reduction", lambda: [dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]),
    ("fallback", lambda: [dl.gpu.Fallback()]),
]  # fmt: skip


# dlight's Matmul rule takes a simdgroup path on Metal whose codegen crashes TVM 0.27
# (a segfault, which no fallback can catch): Metal gets the other rule sets.
SKIP = {"metal": ("matmul+gemv+reduction", "matmul+gemv+spatial")}


def schedule(name: str, func: tirx.PrimFunc, target: tvm.target.Target) -> tuple[str, Any]:
    """(rule set name, scheduled IRModule) for one kernel: the first rule set whose schedule
    lowers, with every launch reading only the kernel's own buffers (a rule that leaves an
    intermediate in device memory between launches does not count)."""
    errors = []
    params = [p.name for p in func.params]
    sets = RULE_SETS
    if _many_short_sums(func):
        sets = [SPATIAL_SETS[1], *RULE_SETS] if _pads(func) else [*SPATIAL_SETS, *RULE_SETS]
    for label, rules in sets:
        if label in SKIP.get(target.kind.name, ()):
            continue
        prepared = _inline_producers(func) if label in dict(SPATIAL_SETS) else func
        mod = tvm.IRModule({name: prepared.with_attr("global_symbol", name)})
        try:
            with target:
                mod = dl.ApplyDefaultSchedule(*rules())(mod)
            host, _, _ = _lower(mod, target)  # fail here, not in the executor
            _launch_buffers(host, params)
            return label, mod
        except Exception as e:  # noqa: BLE001 - any failure moves on to the next rule set
            errors.append(
                f"{label}: {type(e).__name__}: {(str(e).strip() or '?').splitlines()[-1][:200]}"
            )
    raise CompileError(f"kernel {name} cannot be scheduled for {target.kind.name}: {errors}")


def _inline_producers(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The kernel with its elementwise producers (a convolution's padding) computed where they
    are read: Fallback would give each its own loop nest, an intermediate between launches."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        kinds = {int(v.iter_type) for v in sch.get(block).iter_vars}
        if kinds <= {tirx.IterVar.DataPar} and sch.get_consumers(block):
            try:
                sch.compute_inline(block)
            except s_tir.schedule.ScheduleError:
                pass  # left to the rules as it is
    return sch.mod["main"]


def _pads(func: tirx.PrimFunc) -> bool:
    """Whether the kernel reads an input through a padding block (a value or zero where the
    index falls outside it: `if_then_else`)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    found = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        body = sch.get(block).body
        if sch.get_consumers(block) and isinstance(body, tirx.BufferStore):
            tvm_ffi.structural_walk(body.value, (tvm.ir.expr.Call, lambda c: found.append(
                c.op.same_as(tvm.ir.Op.get("prim.if_then_else")))))  # fmt: skip
    return any(found)


def _many_short_sums(func: tirx.PrimFunc) -> bool:
    """Whether every reduction block of the kernel makes at least MANY_OUTPUTS sums of at most
    SHORT_SUM terms (and it has one)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    reductions = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        spatial, reduced = 1, 1
        for v in sch.get(block).iter_vars:
            extent = v.dom.extent
            if not isinstance(extent, tirx.IntImm):
                return False
            if int(v.iter_type) == tirx.IterVar.CommReduce:
                reduced *= int(extent)
            else:
                spatial *= int(extent)
        if reduced > 1:
            reductions.append((spatial, reduced))
    return bool(reductions) and all(s >= MANY_OUTPUTS and r <= SHORT_SUM for s, r in reductions)


def _lower(mod: tvm.IRModule, target: tvm.target.Target):
    """(host IRModule, device IRModule, device target) after TVM's TIR pipeline."""
    from tvm.tirx.build import split_host_device_mods

    mod = tirx.transform.BindTarget(target)(mod)
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    host, devices = split_host_device_mods(pipeline(mod))
    ((device_target, device),) = devices.items()
    return host, finalize_device()(device), device_target


def build_record(name: str, func: tirx.PrimFunc, target: tvm.target.Target, limits) -> dict:
    """Schedule and generate one kernel; returns its record (see the module docstring)."""
    return build_record_module(name, func, target, limits)[0]


def build_record_module(name: str, func: tirx.PrimFunc, target: tvm.target.Target, limits
                        ) -> tuple[dict, tvm.IRModule]:  # fmt: skip
    """(record, scheduled IRModule) of one kernel: the module is what TVM's own runtime
    builds from (the cuda and metal libraries)."""
    from tvm.tirx.build import codegen_build

    label, mod = schedule(name, func, target)
    host, device, device_target = _lower(mod, target)
    runtime_mod = codegen_build(device, device_target)
    info = _function_info(device, runtime_mod)
    source = runtime_mod.inspect_source()
    params = [p.name for p in func.params]
    scalars = {p.name for p in func.params if not isinstance(p.ty, tvm.ir.PointerType)}
    shared = _shared_bytes(device)
    dispatches = []
    launches, bound = _kernel_launches(host, scalars)
    for call in launches:
        entry = call.args[0].value
        fi = info[entry]
        n_args = len(fi["arg_types"])
        tags = [t for t in fi["launch_param_tags"] if not t.startswith("paramWriteAccess")]
        write_tag = [t for t in fi["launch_param_tags"] if t.startswith("paramWriteAccess:")]
        writable = json.loads(write_tag[0].split(":", 1)[1]) if write_tag else []
        args = []
        for dtype, value in zip(fi["arg_types"], call.args[1 : 1 + n_args], strict=True):
            if dtype == "handle":
                args.append({"buffer": params.index(_buffer_param(value, params))})
            else:
                args.append({"pod": dtype, "expr": _scalar_expr(value, bound, scalars, name)})
        grid, workgroup = [1, 1, 1], [1, 1, 1]
        for tag, value in zip(tags, call.args[1 + n_args :], strict=True):
            dims = grid if tag.startswith("blockIdx") else workgroup
            dims["xyz".index(tag[-1])] = _scalar_expr(value, bound, scalars, name)
        dispatches.append({
            "entry": entry, "args": args, "writable": writable, "grid": grid,
            "workgroup": workgroup, "shared_bytes": shared.get(entry, 0),
        })  # fmt: skip
    record = {"schedule": label, "params": params, "source": source, "dispatches": dispatches}
    check_limits(name, record, limits)
    return record, mod


def _function_info(device: tvm.IRModule, runtime_mod) -> dict[str, dict]:
    """Per device function: argument types ("handle" or a dtype) and launch tags, read from the
    device IR (the WebGPU module also says which buffers each function writes)."""
    info = {}
    for gv, func in device.functions_items():
        info[gv.name_hint] = {
            "arg_types": [
                "handle" if isinstance(p.ty, tvm.ir.PointerType) else str(p.ty.dtype)
                for p in func.params
            ],
            "launch_param_tags": [str(t) for t in func.attrs["tirx.kernel_launch_params"]],
        }
    if runtime_mod.kind == "webgpu":
        for name, fi in json.loads(runtime_mod.inspect_source("func_info")).items():
            info[name]["launch_param_tags"] = fi["launch_param_tags"]
            info[name]["arg_types"] = fi["arg_types"]
    return info


def _launch_buffers(host: tvm.IRModule, params: list[str]) -> None:
    """Check that every buffer a launch passes is one of the kernel's parameters."""
    launches, _ = _kernel_launches(host, set())
    for call in launches:
        for value in call.args[1:]:
            if isinstance(getattr(value, "ty", None), tvm.ir.PointerType):
                _buffer_param(value, params)


def _kernel_launches(host: tvm.IRModule, scalars: set[str]) -> tuple[list, dict]:
    """The host code's kernel launches, and the values of the variables it binds besides the
    kernel's scalars (TVM binds a launch value that several dispatches share to a variable of
    its own), each in terms of the scalars."""
    found, bound = [], {}

    def visit(node, visitor):
        if isinstance(node, tvm.ir.Call) and getattr(node.op, "name", "") == "tirx.call_ffi_kernel":
            found.append(node)
        elif isinstance(node, tirx.Bind) and node.var.name not in scalars:
            bound[node.var] = _substitute(node.value, bound)  # earlier bindings come first
        visitor.default_visit(node)

    for _, func in host.functions_items():
        tvm_ffi.structural_visit(func.body, [(tvm_ffi.Object, visit)])
    return found, bound


def _substitute(expr, values: dict):
    return tvm_ffi.structural_map(expr, (tirx.Var, lambda v: values.get(v, v)))


def _buffer_param(value, params: list[str]) -> str:
    """The kernel parameter a launch argument's data pointer belongs to."""
    names = []

    def visit(node, visitor):
        name = getattr(node, "name", None)
        if isinstance(name, str):
            names.append(name)
        visitor.default_visit(node)

    tvm_ffi.structural_visit(value, [(tvm_ffi.Object, visit)])
    for candidate in names:
        for suffix in ("", "_data"):
            base = candidate.removesuffix(suffix) if suffix else candidate
            if base in params:
                return base
    raise CompileError(f"cannot tell which buffer launch argument {value} refers to")


def _scalar_expr(value, bound: dict, scalars: set[str], kernel: str) -> Any:
    """A launch value as a plan expression of the kernel's scalar parameters (`bound`: the
    host's bound variables, see `_kernel_launches`)."""
    expr = expr_to_json(_substitute(value, bound))
    unknown = _variables(expr) - scalars
    if unknown:
        raise CompileError(f"{kernel}: a launch value depends on {sorted(unknown)}: {value}")
    return expr


def _variables(expr: Any) -> set[str]:
    if isinstance(expr, dict):
        if "var" in expr:
            return {expr["var"]}
        return set().union(*(_variables(a) for a in expr["args"]))
    return set()


_ALLOC = re.compile(r"shared")


def _shared_bytes(device: tvm.IRModule) -> dict[str, int]:
    """Workgroup (shared) memory each device function allocates, in bytes."""
    sizes: dict[str, int] = {}
    for gv, func in device.functions_items():
        total = 0

        def visit(node, visitor):
            nonlocal total
            if isinstance(node, tirx.AllocBuffer) and _ALLOC.search(node.buffer.scope()):
                count = 1
                for extent in node.buffer.shape:
                    count *= int(extent)
                total += count * tvm.DataType(node.buffer.dtype).bits // 8
            visitor.default_visit(node)

        tvm_ffi.structural_visit(func.body, [(tvm_ffi.Object, visit)])
        sizes[gv.name_hint] = total
    return sizes


def check_limits(name: str, record: dict, limits) -> None:
    """Refuse a kernel whose dispatches exceed the target's per-dispatch limits."""
    for d in record["dispatches"]:
        threads = 1
        for value in d["workgroup"]:
            if not isinstance(value, int):
                raise CompileError(f"kernel {name}: workgroup size {value} is not static")
            threads *= value
        if threads > limits.max_invocations:
            raise CompileError(
                f"kernel {name} ({d['entry']}) uses {threads} invocations per workgroup; "
                f"the target allows {limits.max_invocations}"
            )
        if d["shared_bytes"] > limits.max_workgroup_storage:
            raise CompileError(
                f"kernel {name} ({d['entry']}) uses {d['shared_bytes']} bytes of workgroup "
                f"storage; the target allows {limits.max_workgroup_storage}"
            )
        buffers = sum(1 for a in d["args"] if "buffer" in a)
        if buffers > limits.max_storage_buffers:
            raise CompileError(
                f"kernel {name} ({d['entry']}) binds {buffers} storage buffers; the target "
                f"allows {limits.max_storage_buffers} per stage"
            )


def compile_records(kernels: dict, target, spec, progress: bool = False) -> dict[str, dict]:
    """Every kernel's record, by kernel name, compiled on every core."""
    from .workers import compile_each

    return compile_each(build_record, kernels, target, spec.limits,
                        desc=f"compiling {spec.name} kernels", progress=progress)  # fmt: skip


def compile_records_and_modules(kernels: dict, target, spec, progress: bool = False
                                ) -> tuple[dict[str, dict], dict[str, tvm.IRModule]]:  # fmt: skip
    """(records, scheduled modules) of every kernel, by kernel name, for a target that also
    builds TVM's own library (cuda, metal on a Mac): compiled in this process, where the
    modules stay (TVM cannot pickle every one)."""
    from .workers import compile_each

    built = compile_each(build_record_module, kernels, target, spec.limits, here=True,
                         desc=f"compiling {spec.name} kernels", progress=progress)  # fmt: skip
    return {n: record for n, (record, _) in built.items()}, {n: m for n, (_, m) in built.items()}
