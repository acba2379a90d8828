"""The reference path: the same fused Relax module run by TVM's Relax VM on the CPU.

It shares nothing with the plan executors but the fused module itself, so the plan's
outputs are checked against it (same inputs, same weights, same entry points).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tapml.plan import Plan


class RelaxVM:
    """Runs a plan's entry points through the Relax VM, keeping the KV state between calls."""

    def __init__(self, fused_module: Any, plan: Plan, params: Mapping[str, np.ndarray]):
        import tvm
        from tvm import relax

        from tapml.targets import get_target

        from .llvm_schedules import schedule

        self._tvm = tvm
        self.plan = plan
        device = tvm.cpu()
        target = get_target("llvm").tvm_target()
        # The kernels get the llvm target's schedules (which change loops, not values):
        # unscheduled, the separate dequantize stages would hold whole weights as temporaries.
        vm_exec = tvm.compile(schedule(fused_module, target), target=target)
        self._vm = relax.VirtualMachine(vm_exec, device)
        self._params = [tvm.runtime.tensor(params[n], device) for n in plan.names("param")]
        self._state_names = plan.names("state")
        # How each entry point takes its arguments: inputs, scalars (as shapes), state.
        self._signature = {}
        for name in plan.functions:
            func = fused_module[name]
            n_inputs = int(func.attrs["num_input"])
            self._signature[name] = [
                [v.name for v in p.ty.values] if isinstance(p.ty, relax.ShapeType) else p.name
                for p in func.params[:n_inputs]
            ]
        self.reset_state()

    def reset_state(self) -> None:
        tvm = self._tvm
        self._state = [
            tvm.runtime.tensor(np.zeros(b["shape"], b["dtype"]))
            for b in (self.plan.buffers[n] for n in self._state_names)
        ]

    def run(self, function: str, scalars: Mapping[str, int], inputs: Mapping[str, np.ndarray],
            interrupt: Callable[[], None] | None = None) -> np.ndarray:  # fmt: skip
        """Same contract as Executor.run (one VM call: nothing to interrupt); returns the
        logits."""
        self.plan.check_scalars(function, dict(scalars))
        for name, array in inputs.items():
            self.plan.check_values(name, array)
        tvm = self._tvm
        state = dict(zip(self._state_names, self._state, strict=True))
        args = []
        for p in self._signature[function]:
            if isinstance(p, list):
                args.append(tvm.runtime.ShapeTuple([int(scalars[v]) for v in p]))
            elif p in state:
                args.append(state[p])
            else:
                array = np.ascontiguousarray(inputs[f"{function}.{p}"])
                args.append(tvm.runtime.tensor(array))
        out = self._vm[function](*args, *self._params)
        self._state = list(out[1:])
        return out[0].numpy()
