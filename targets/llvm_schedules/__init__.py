"""CPU schedules for the plan's kernels, picked by pattern (block structure, iter kinds, shapes).

Like dlight's rules, but for the kernels tapml.nn produces: a matmul with one output row
(decode GEMV; `packed.py` for quantized weights, `int8_gemv.py` with int8 activations), a
matmul with many rows (prefill GEMM; `int8.py` with int8 activations), a
row reduction followed by elementwise blocks (RMSNorm), elementwise kernels, and independent
rows with bodies of their own (the hand-written attention); and for the kernels of ONNX
graphs, convolutions (`conv.py`: conv2d with its padding and epilogue, depthwise, strided,
transposed). Kernels that match no rule are left as they are.
"""

from __future__ import annotations

import logging

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.schedule import ScheduleError

from .base import PREFETCH_BYTES, Kernel, Rule
from .conv import conv2d, conv2d_transpose
from .fast_math import fast_exp, fast_math
from .int8 import int8_gemm
from .int8_gemv import int8_gemv
from .matmul import gemm, gemv
from .packed import packed_gemv, prefetch, prefetch_rows
from .rows import elementwise, finish_rows, independent_rows, row_reduction

__all__ = ["ATTR", "PREFETCH_BYTES", "RULES", "Kernel", "fast_exp", "prefetch", "schedule",
           "schedule_func"]  # fmt: skip

log = logging.getLogger("tapml")

ATTR = "tapml.schedule"
RULES: list[Rule] = [
    Rule("int8_gemv", int8_gemv, prefetch_rows),
    Rule("packed_gemv", packed_gemv, prefetch_rows),
    Rule("gemv", gemv),
    Rule("int8_gemm", int8_gemm),
    Rule("gemm", gemm),
    Rule("conv2d_transpose", conv2d_transpose),
    Rule("conv2d", conv2d),
    Rule("row_reduction", row_reduction),
    Rule("elementwise", elementwise),
    Rule("independent_rows", independent_rows, finish_rows),
]


def _already_scheduled(func: tirx.PrimFunc) -> bool:
    found = []
    tvm_ffi.structural_walk(
        func.body, (tirx.For, lambda f: found.append(f.kind != tirx.ForKind.SERIAL))
    )
    return any(found)


def schedule_func(func: tirx.PrimFunc, target: tvm.target.Target, int8: frozenset[str] = frozenset()
                  ) -> tirx.PrimFunc:  # fmt: skip
    """The PrimFunc scheduled by the first rule that matches it, tagged with the rule's name;
    `int8`: the matmuls that may quantize their activations, "prefill" (many rows, `int8.py`)
    and "decode" (one row, `int8_gemv.py`)."""
    if _already_scheduled(func):
        return func
    for rule in RULES:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        kernel = Kernel(sch, list(sch.get_child_blocks(root)), target, int8=int8)
        try:
            applies = rule.apply(kernel)
        except ScheduleError as e:  # a pattern the rule matched but cannot schedule
            log.debug("rule %s does not apply to %s: %s", rule.name,
                      func.attrs.get("global_symbol"), str(e).splitlines()[0])  # fmt: skip
            continue
        if applies:
            scheduled = kernel.sch.mod["main"]  # a rule may have rebuilt the kernel
            if rule.finish is not None:
                scheduled = rule.finish(scheduled, kernel)
            return fast_math(scheduled).with_attr(ATTR, rule.name)
    return fast_math(func)


def schedule(mod: tvm.IRModule, target: tvm.target.Target, int8: frozenset[str] = frozenset()
             ) -> tvm.IRModule:  # fmt: skip
    """Schedule each PrimFunc of `mod` for the llvm `target`; others are left unchanged."""
    funcs = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            func = schedule_func(func, target, int8)
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)

