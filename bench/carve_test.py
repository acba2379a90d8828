"""Carving and testing cost: carve every scenario on llvm, replay the suite on webgpu and opencl.

    .venv/bin/python bench/carve_test.py [--model smollm2-135m] [--quantization Q]

Compiles first (cached), so the times are carving and replay alone: time to carve all
scenarios, calls made vs kept, suite size on disk, and time to replay every kept call on each
target (one executor per kernel, each call launched twice: once cold, once timed). The goal:
carve + test of every kernel on webgpu under 2 minutes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tapml.api import ensure_compiled
from tapml.carving.carve import carve
from tapml.carving.replay import replay
from tapml.carving.scenarios import select
from tapml.targets import TARGETS, load_executor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default=None, help="default: as stored (gguf)")
    parser.add_argument("--targets", nargs="+", default=["webgpu", "opencl"])
    args = parser.parse_args()
    source = ensure_compiled(args.model, "llvm", args.quantization,
                             target_options=TARGETS["llvm"].reference_options())
    artifacts = {t: ensure_compiled(args.model, t, args.quantization) for t in args.targets}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        suite = carve(source, Path(tmp) / "suite", select(), args.model, progress=False)
        carve_s = time.perf_counter() - start
        kernels = suite.manifest["kernels"]
        made = sum(k["calls"] for k in kernels.values())
        print(f"carve: {carve_s:.1f} s for {len(suite.manifest['scenarios'])} scenarios; "
              f"{made} calls made, {len(suite.calls)} kept ({len(kernels)} kernels); "
              f"suite {suite.arrays.nbytes() / 2**20:.1f} MiB on disk")
        for target, artifact in artifacts.items():
            start = time.perf_counter()
            report = replay(suite, target, lambda plan, t=target, a=artifact:
                            load_executor(t, plan, a), target, progress=False)  # fmt: skip
            test_s = time.perf_counter() - start
            print(f"test on {target}: {test_s:.1f} s for {len(report.calls)} calls, "
                  f"{len(report.failed)} failed; carve + test {carve_s + test_s:.1f} s")


if __name__ == "__main__":
    main()
