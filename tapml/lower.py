"""Lower a Relax module to fused TIR kernels and extract the execution plan from it."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax

from .errors import CompileError
from .plan import Plan


def fuse(mod: tvm.IRModule, entry_points: list[str]) -> tvm.IRModule:
    """The target-independent Relax pipeline: every op becomes a call to a fused PrimFunc.

    It stops before the VM-specific passes, so each entry point is still a straight line of
    `call_tir` / `call_tir_inplace` / `reshape` bindings that the plan can be read from.
    """
    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(list(entry_points)),
            relax.transform.RewriteDataflowReshape(),
        ]
    )(mod)


def kernel_functions(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    """The fused PrimFuncs by name, each with a global symbol so it can be built alone."""
    return {
        gv.name_hint: func.with_attr("global_symbol", gv.name_hint)
        for gv, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
    }


# -- TIR scalar expressions -> the plan's JSON expressions ------------------------------
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Mod": "mod",
    "FloorDiv": "floordiv", "FloorMod": "floormod", "Min": "min", "Max": "max",
    "EQ": "eq", "NE": "ne", "LT": "lt", "LE": "le", "GT": "gt", "GE": "ge",
    "And": "and", "Or": "or",
}  # fmt: skip


def expr_to_json(e: Any) -> Any:
    kind = type(e).__name__
    if isinstance(e, int):
        return e
    if kind == "IntImm":
        return int(e.value)
    if kind == "FloatImm":
        return float(e.value)
    if kind in ("Var", "SizeVar"):
        return {"var": e.name}
    if kind in _BINARY:
        return {"op": _BINARY[kind], "args": [expr_to_json(e.a), expr_to_json(e.b)]}
    if kind == "Cast":
        return {"op": "cast", "dtype": str(e.dtype), "args": [expr_to_json(e.value)]}
    if kind == "Select":
        args = [e.condition, e.true_value, e.false_value]
        return {"op": "select", "args": [expr_to_json(a) for a in args]}
    if kind == "Not":
        return {"op": "not", "args": [expr_to_json(e.a)]}
    raise CompileError(f"cannot express {kind} ({e}) in a plan")


# -- plan extraction ---------------------------------------------------------------------
def _shape_dtype(ty) -> tuple[list[int], str]:
    return [int(x) for x in ty.shape.values], str(ty.dtype)


def _is_var(x) -> bool:
    return isinstance(x, relax.Var)


class _Extractor:
    def __init__(self, param_names: list[str], state_names: list[str]):
        self.param_names, self.state_names = param_names, set(state_names)
        self.buffers: dict[str, dict[str, Any]] = {}
        self.functions: dict[str, dict[str, Any]] = {}
        self.constants: dict[str, Any] = {}  # tensor constants made parameters: name -> value
        self._call_tir = tvm.ir.Op.get("relax.call_tir")
        self._inplace = tvm.ir.Op.get("relax.call_tir_inplace")
        self._reshape = tvm.ir.Op.get("relax.reshape")

    def add(self, name: str, shape: list[int], dtype: str, kind: str, **extra) -> str:
        known = self.buffers.get(name)
        if known is None:
            self.buffers[name] = {"shape": shape, "dtype": dtype, "kind": kind, **extra}
        elif (known["shape"], known["dtype"]) != (shape, dtype):
            raise CompileError(f"buffer {name} has two shapes: {known['shape']} and {shape}")
        return name

    def function(self, fname: str, func: relax.Function) -> None:
        num_inputs = int(func.attrs["num_input"])
        env: dict[relax.Var, Any] = {}
        scalars, inputs, calls = [], [], []
        temps = 0
        for i, p in enumerate(func.params):
            if isinstance(p.ty, relax.ShapeType):
                scalars += [v.name for v in p.ty.values]
                continue
            shape, dtype = _shape_dtype(p.ty)
            if i >= num_inputs:
                name = self.param_names[i - num_inputs]
                env[p] = self.add(name, shape, dtype, "param")
            elif p.name in self.state_names:
                env[p] = self.add(p.name, shape, dtype, "state")
            else:
                env[p] = self.add(f"{fname}.{p.name}", shape, dtype, "input")
                inputs.append(env[p])

        def temp(ty, kind, **extra) -> str:
            nonlocal temps
            shape, dtype = _shape_dtype(ty)
            temps += 1
            return self.add(f"{fname}.t{temps}", shape, dtype, kind, **extra)

        for block in func.body.blocks:
            for binding in block.bindings:
                var, value = binding.var, binding.value
                if _is_var(value):
                    env[var] = env[value]
                elif isinstance(value, relax.TupleGetItem):
                    env[var] = env[value.tuple_value][value.index]
                elif isinstance(value, relax.Call) and value.op.same_as(self._reshape):
                    env[var] = temp(var.ty, "view", base=env[value.args[0]])
                elif isinstance(value, relax.Call) and (
                    value.op.same_as(self._call_tir) or value.op.same_as(self._inplace)
                ):
                    env[var] = self._call(value, var, env, temp, calls)
                elif isinstance(value, relax.Tuple):
                    env[var] = tuple(env[f] for f in value.fields)
                else:
                    raise CompileError(
                        f"{fname}: cannot put {type(value).__name__} ({var.name}) in a plan"
                    )
        ret = func.body.body
        outputs = list(env[ret]) if isinstance(env[ret], tuple) else [env[ret]]
        for out in outputs:
            if self.buffers[out]["kind"] == "temp":
                self.buffers[out]["kind"] = "output"
        self.functions[fname] = {
            "scalars": scalars, "inputs": inputs, "outputs": outputs, "calls": calls,
        }  # fmt: skip

    def _constant(self, const: tvm.ir.expr.Constant) -> str:
        """A parameter holding a constant tensor the fused graph passes to a kernel."""
        for name, known in self.constants.items():
            if known.same_as(const):
                return name
        name = f"const.{len(self.constants)}"
        self.constants[name] = const
        shape, dtype = _shape_dtype(const.ty)
        return self.add(name, shape, dtype, "param")

    def _call(self, value: relax.Call, var: relax.Var, env, temp, calls) -> Any:
        kernel = value.args[0].name_hint
        args: list[dict[str, Any]] = []
        for a in value.args[1].fields:
            if isinstance(getattr(a, "ty", None), tvm.ir.PrimType):  # a scalar passed inline
                args.append({"scalar": expr_to_json(a)})
            elif _is_var(a):
                args.append({"buffer": env[a]})
            elif isinstance(a, tvm.ir.expr.Constant):  # a folded tensor (an imported graph's)
                args.append({"buffer": self._constant(a)})
            else:
                raise CompileError(f"{kernel}: unsupported argument {type(a).__name__}")
        sinfo = var.ty
        outs_sinfo = list(sinfo.fields) if isinstance(sinfo, relax.TupleType) else [sinfo]
        inplace = (
            list(value.attrs.inplace_indices)
            if value.op.same_as(self._inplace)
            else [-1] * len(outs_sinfo)
        )
        outputs = []
        for ty, index in zip(outs_sinfo, inplace, strict=True):
            if index >= 0:  # writes input `index` in place: nothing new is passed
                outputs.append(args[index]["buffer"])
            else:
                outputs.append(temp(ty, "temp"))
                args.append({"buffer": outputs[-1]})
        calls.append({"kernel": kernel, "args": args, "writes": outputs})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def extract_plan(mod: tvm.IRModule, param_names: list[str], state_names: list[str],
                 model: dict[str, Any], task: dict[str, Any],
                 constants: dict[str, Any] | None = None) -> Plan:  # fmt: skip
    """Read the plan off a fused module (see `fuse`), then place temporaries in storages.

    Tensor constants that kernels read (an imported graph's folded values) become parameters
    `const.N`; their values go into `constants` (a dict to fill, as numpy arrays).

    `task` says how a runtime drives the entry points (docs/formats.md): each entry point it
    names becomes a function of the plan, with the scalar requirements the task gives it, and
    its token input the range of ids the task allows.
    """
    ex = _Extractor(param_names, state_names)
    task = dict(task)
    for role in [r for r, entry in task.items() if isinstance(entry, dict)]:
        entry = dict(task[role])
        fname = entry["function"]
        ex.function(fname, mod[fname])
        ex.functions[fname]["requires"] = entry.pop("requires", [])
        if "token_range" in entry:
            ex.buffers[entry["tokens"]]["range"] = entry.pop("token_range")
        task[role] = entry
    kinds = {name: kernel_kind(func) for name, func in kernel_functions(mod).items()}
    used = {call["kernel"] for f in ex.functions.values() for call in f["calls"]}
    plan = Plan(ex.buffers, {}, ex.functions, model, task,
                {k: kind for k, kind in kinds.items() if k in used})  # fmt: skip
    plan.storages = plan_memory(plan)
    plan.validate()
    if ex.constants and constants is None:
        raise CompileError(f"the module passes {len(ex.constants)} constant tensors to kernels")
    if constants is not None:
        constants.update({name: c.value.numpy() for name, c in ex.constants.items()})
    return plan


def kernel_kind(func: tvm.tirx.PrimFunc) -> str:
    """What a kernel does (one of `tapml.plan.KERNEL_KINDS`), told from its blocks rather than
    its name: "opaque" (a block with code of its own, e.g. attention), "lookup" (a read at an index
    read from another buffer: an embedding), "matmul" (a reduction of products of two
    buffers' elements), "reduction" (other reductions: norms) or "elementwise"."""
    import tvm_ffi
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if any(not isinstance(b.body, tvm.tirx.BufferStore) for b in blocks):
        return "opaque"
    gathers = []

    def visit(load):
        for index in load.indices:
            tvm_ffi.structural_walk(index, (tvm.ir.expr.TensorLoad, gathers.append))

    tvm_ffi.structural_walk(func.body, (tvm.ir.expr.TensorLoad, visit))
    if gathers:
        return "lookup"
    reduce = tvm.tirx.IterVar.CommReduce
    reductions = [b for b in blocks if any(int(v.iter_type) == reduce for v in b.iter_vars)]
    if not reductions:
        return "elementwise"
    return "matmul" if any(_sums_products(b) for b in reductions) else "reduction"


def _sums_products(block) -> bool:
    """Whether a reduction block adds products of elements of two different buffers."""
    import tvm_ffi

    products = []

    def visit(mul):
        loads = []
        tvm_ffi.structural_walk(mul, (tvm.ir.expr.TensorLoad, loads.append))
        products.append(len({load.source.name for load in loads}) >= 2)

    tvm_ffi.structural_walk(block.body.value, (tvm.tirx.Mul, visit))
    return any(products) and len(block.reads) >= 2


def plan_memory(plan: Plan) -> dict[str, int]:
    """Greedy liveness-based reuse of temporaries, one pool shared by all entry points.

    A storage is released only after the call that last uses it, so no kernel ever gets
    the same storage as an input and an output (WebGPU rejects aliased writable bindings).
    """
    sizes: list[int] = []
    for f in plan.functions.values():
        first, last = {}, {}
        for i, call in enumerate(f["calls"]):
            for arg in call["args"]:
                if "buffer" in arg:
                    root = plan.root(arg["buffer"])
                    if plan.buffers[root]["kind"] == "temp":
                        first.setdefault(root, i)
                        last[root] = i
        free: list[int] = []
        used: dict[int, int] = {}  # storage -> bytes needed by this function
        for i in range(len(f["calls"])):
            for name in [n for n, at in first.items() if at == i]:
                need = plan.nbytes(name)
                fits = [s for s in free if max(used.get(s, 0), sizes[s]) >= need]
                pick = min(fits, key=lambda s: sizes[s]) if fits else (free[0] if free else None)
                if pick is None:
                    pick = len(sizes)
                    sizes.append(0)
                else:
                    free.remove(pick)
                used[pick] = max(used.get(pick, 0), need)
                sizes[pick] = max(sizes[pick], need)
                plan.buffers[name]["storage"] = f"s{pick}"
            free += [int(plan.buffers[n]["storage"][1:]) for n, at in last.items() if at == i]
    return {f"s{i}": n for i, n in enumerate(sizes)}


def param_nbytes(plan: Plan) -> int:
    return sum(plan.nbytes(n) for n in plan.names("param"))
