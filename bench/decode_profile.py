"""Where a decode (or prefill) step's time goes on llvm: per-kernel times, and the Python cost.

    .venv/bin/python bench/decode_profile.py [--model smollm2-135m] [--threads 1]
        [--pos 256] [--function decode] [--repeats 5] [--prefill auto] [--decode auto]

The step's calls are timed one by one, in order (so each kernel finds the caches as a real
step leaves them), over `--repeats` steps; each call's median is summed per kernel name. The
step's own time (all calls back to back through Executor.run) is printed beside the sum, so
their difference is roughly the Python cost per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from tapml.api import ensure_compiled
from tapml.bench import prompt_ids
from tapml.runtime.engine import Engine
from tapml.targets import INT8_CHOICES, INT8_STAGES
from tapml.targets.llvm import use_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default=None, help="default: as stored (gguf)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pos", type=int, default=256, help="context already in the cache")
    parser.add_argument("--function", default="decode", choices=["decode", "prefill"])
    for stage in INT8_STAGES:
        parser.add_argument(f"--{stage}", default="auto", choices=INT8_CHOICES,
                            help=f"compile with --target-option {stage}={stage.upper()}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    use_threads(args.threads)
    engine = Engine(ensure_compiled(args.model, "llvm", args.quantization,
                                    target_options={s: getattr(args, s) for s in INT8_STAGES}))
    engine.reset()
    engine.prefill(prompt_ids(engine.tokenizer, args.pos))
    if args.function == "decode":
        function, scalars, inputs = engine.task.decode(engine.pos, 1)
    else:
        function, scalars, inputs = engine.task.prefill(engine.pos, [1] * engine.chunk)
    executor, calls = engine.executor, engine.plan.functions[function]["calls"]

    steps = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        executor.run(function, scalars, inputs)
        steps.append(time.perf_counter() - start)
    samples = [
        [executor.time_call(function, i, scalars) for i in range(len(calls))]
        for _ in range(args.repeats)
    ]
    per_call = [statistics.median(s) for s in zip(*samples, strict=True)]
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for call, seconds in zip(calls, per_call, strict=True):
        totals[call["kernel"]] += seconds
        counts[call["kernel"]] += 1
    step, summed = statistics.median(steps), sum(per_call)
    print(f"{args.function} at pos {engine.pos}: step {step * 1e3:.2f} ms ({1 / step:.1f}/s), "
          f"{len(calls)} calls summing to {summed * 1e3:.2f} ms")
    print(f"{'kernel':52} {'calls':>5} {'ms':>8} {'share':>6}")
    for kernel, seconds in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{kernel:52} {counts[kernel]:5d} {seconds * 1e3:8.3f} {seconds / summed:6.1%}")


if __name__ == "__main__":
    main()
