"""Localizing a bad kernel by offloading: evaluation runs and wall time vs N, over a device agent.

    .venv/bin/python bench/offload.py [--model smollm2-135m] [--sizes 4 8 16 26] [--calls 200]

For each N, the candidate set is the first N kernels of the plan order (the others stay on
llvm) and the last of them is broken (an off-by-one position in its WGSL, or a flipped sign
in an output when it has no position); offloading runs on a wgpu device agent on loopback.
Reported per N: evaluation runs (bound ceil(log2 N) + 2), wall time, seconds per run, and
buffer moves. Then the agent's per-call overhead: a launch round trip, and the upload of
the largest weight.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tapml.artifact import Artifact
from tapml.carving.offload import Offloader, SplitRun, kernel_order
from tapml.carving.scenarios import SCENARIOS
from tapml.carving.workflow import artifacts
from tapml.plan import CausalLM
from tapml.runtime.engine import Engine
from tapml.targets.remote import open_executor, start_local_agent


def break_kernel(artifact: Path, kernel: str, out: Path) -> Path:
    shutil.copytree(artifact, out)
    path = out / "kernels_webgpu.json"
    document = json.loads(path.read_text())
    record = document["kernels"][kernel]
    if "podArgs.pos" in record["source"]:
        record["source"] = record["source"].replace("podArgs.pos", "(podArgs.pos + 1i)")
    else:  # the last store of the kernel writes the negated value
        head, sep, tail = record["source"].rpartition("] = ")
        record["source"] = head + sep + "-" + tail
    path.write_text(json.dumps(document))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 26])
    parser.add_argument("--calls", type=int, default=200, help="launches timed for overhead")
    args = parser.parse_args()
    source_dir, target_dir = artifacts(args.model, "webgpu", None, progress=False)
    source = Engine(source_dir)
    plan, scenario = source.plan, SCENARIOS["chat"]
    runs = scenario.runs(source)
    order = kernel_order(plan, "plan")
    with start_local_agent("wgpu") as url, tempfile.TemporaryDirectory() as tmp:
        print(f"{'N':>3} {'bad kernel':<40} {'runs':>4} {'bound':>5} {'wall s':>7} "
              f"{'s/run':>6} {'moves':>6}")
        for n in args.sizes:
            bad = order[n - 1]
            broken = break_kernel(target_dir, bad, Path(tmp) / f"broken{n}")
            with open_executor(url, "webgpu", plan, broken) as target:
                target.load_params(Artifact(broken).weights())
                split = SplitRun(plan, source.executor, target)
                start = time.perf_counter()
                result = Offloader(split, runs, order[:n], 2e-3).offload()
                wall = time.perf_counter() - start
            assert result.culprit == bad, (result.culprit, bad)
            print(f"{n:>3} {bad:<40} {result.runs:>4} {math.ceil(math.log2(n)) + 2:>5} "
                  f"{wall:>7.1f} {wall / result.runs:>6.1f} {split.moves:>6}")
        with open_executor(url, "webgpu", plan, target_dir) as target:
            function, scalars, inputs = CausalLM(plan).decode(0, 7)
            for name, array in inputs.items():
                target.upload(name, array)
            index = next(i for i, c in enumerate(plan.functions[function]["calls"])
                         if plan.kernel_kinds[c["kernel"]] == "reduction")  # a cheap kernel
            launches = []
            for _ in range(args.calls):
                start = time.perf_counter()
                target.launch(function, index, scalars)
                launches.append(time.perf_counter() - start)
            device = statistics.median(target.time_call(function, index, scalars)
                                       for _ in range(20))  # fmt: skip
            name = max(plan.names("param"), key=plan.nbytes)
            array = np.zeros(plan.buffers[name]["shape"], plan.buffers[name]["dtype"])
            start = time.perf_counter()
            target.upload(name, array)
            upload = time.perf_counter() - start
        print(f"agent launch round trip: {statistics.median(launches) * 1e3:.2f} ms median "
              f"(the kernel itself {device * 1e3:.2f} ms on the device); upload of "
              f"{array.nbytes / 2**20:.1f} MiB: {upload * 1e3:.0f} ms "
              f"({array.nbytes / upload / 2**20:.0f} MiB/s)")


if __name__ == "__main__":
    main()
