"""Decode speed per executable target and weight scheme, and where a decode step's time goes
(webgpu vs llvm).

    .venv/bin/python bench/targets.py [--model smollm2-135m] [--quantization gguf,q4f32_1]

Every target that executes on this machine runs the same prompt in each scheme; the table
gives decode tokens/s, the ratio to llvm, and each scheme's ratio to the first's; then the 10
kernels that take longest in one decode step on webgpu, next to their llvm time (first
scheme). Kernels are timed one call at a time, synchronized, so the per-kernel sums exceed a
pipelined step's time.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from tapml.api import ensure_compiled
from tapml.runtime.engine import Engine
from tapml.runtime.sampling import greedy
from tapml.targets import TARGETS, executes_here

PROMPT = "The capital of France is"


def decode_speed(engine: Engine, steps: int) -> float:
    engine.reset()
    logits = engine.prefill(engine.tokenizer.encode(PROMPT))
    start = time.perf_counter()
    for _ in range(steps):
        logits = engine.decode(greedy(logits))
    return steps / (time.perf_counter() - start)


def kernel_times(engine: Engine) -> dict[str, float]:
    """Seconds per kernel name, summed over the calls of one decode step."""
    engine.reset()
    engine.prefill(engine.tokenizer.encode(PROMPT))
    function, scalars, inputs = engine.task.decode(engine.pos, 1)
    engine.executor.begin_run(function, scalars, inputs)
    totals: dict[str, float] = defaultdict(float)
    for index, call in enumerate(engine.plan.functions[function]["calls"]):
        totals[call["kernel"]] += engine.executor.time_call(function, index, scalars)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="gguf,q4f32_1",
                        help="schemes, comma-separated")  # fmt: skip
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    schemes = args.quantization.split(",")
    targets = []
    for name, spec in TARGETS.items():
        ok, why = executes_here(spec)
        if ok:
            targets.append(name)
        else:
            print(f"{name:8} generated, not executed ({why})")
    speeds = {}
    for name in targets:
        for q in schemes:
            engine = Engine(ensure_compiled(args.model, name, q))
            speeds[name, q] = decode_speed(engine, args.steps)
    print(f"\n{'target':8} {'scheme':8} {'decode tok/s':>12} {'vs llvm':>8} "
          f"{'vs ' + schemes[0]:>12}")  # fmt: skip
    for (name, q), speed in speeds.items():
        print(f"{name:8} {q:8} {speed:12.1f} {speed / speeds['llvm', q]:8.2f}x "
              f"{speed / speeds[name, schemes[0]]:11.2f}x")  # fmt: skip
    if "webgpu" in targets:
        gpu, cpu = (kernel_times(Engine(ensure_compiled(args.model, t, schemes[0])))
                    for t in ("webgpu", "llvm"))  # fmt: skip
        print(f"\n{'kernel (one decode step)':44} {'webgpu ms':>10} {'llvm ms':>9}")
        for kernel, seconds in sorted(gpu.items(), key=lambda kv: -kv[1])[:10]:
            print(f"{kernel:44} {seconds * 1e3:10.2f} {cpu[kernel] * 1e3:9.2f}")


if __name__ == "__main__":
    main()
