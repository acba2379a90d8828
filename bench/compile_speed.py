"""Compile time per target: kernels compiled by one worker against every core's workers.

    .venv/bin/python bench/compile_speed.py [--model smollm2-135m] [--target llvm,webgpu]
                                            [--workers 1,2] [--repeats 1]

Each compile runs in a fresh process with $TAPML_COMPILE_WORKERS set, into a temporary
directory (the weights are converted once and then shared, as every compile shares them);
the table gives the seconds the kernels took and the whole compile's, medians of the repeats,
and each setting's speedup over the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def compile_once(model: str, target: str) -> dict[str, float]:
    """In a fresh process: seconds of the whole compile and of its kernels."""
    import tapml.targets as targets
    from tapml.compiler import CompileOptions, compile_model
    from tapml.models import resolve_gguf

    build, spent = targets.build_kernels, {}

    def timed(*args, **kwargs):
        start = time.perf_counter()
        build(*args, **kwargs)
        spent["kernels_s"] = time.perf_counter() - start

    targets.build_kernels = timed
    _, gguf = resolve_gguf(model)
    options = CompileOptions.resolve(target, source=gguf)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        compile_model(gguf, Path(out) / "artifact", options, progress=False)
        return {"total_s": time.perf_counter() - start, **spent}


def measure(model: str, target: str, workers: int) -> dict[str, float]:
    env = {**os.environ, "TAPML_COMPILE_WORKERS": str(workers)}
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from compile_speed import compile_once; "
            f"print(json.dumps(compile_once({model!r}, {target!r})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="llvm,webgpu", help="targets, comma-separated")
    parser.add_argument("--workers", default=f"1,{min(os.cpu_count() or 1, 8)}",
                        help="worker counts to compare, comma-separated")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    counts = [int(n) for n in args.workers.split(",")]
    print("| target | workers | kernels (s) | whole compile (s) | speedup |")
    print("| --- | --- | --- | --- | --- |")
    for target in args.target.split(","):
        measure(args.model, target, counts[-1])  # converts the weights once, untimed
        first = None
        for n in counts:
            runs = [measure(args.model, target, n) for _ in range(args.repeats)]
            kernels = statistics.median(r["kernels_s"] for r in runs)
            total = statistics.median(r["total_s"] for r in runs)
            first = first or kernels
            print(f"| {target} | {n} | {kernels:.1f} | {total:.1f} | {first / kernels:.2f}x |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
