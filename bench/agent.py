"""What the device agent costs over a local executor: per-call round trip, transfer bandwidth,
and a decode step run locally and through an agent on this machine (loopback).

    .venv/bin/python bench/agent.py [--model smollm2-135m] [--target webgpu] [--steps 16]

One agent (`tapml device serve`, started here on a free loopback port) and one local
executor of the same target run the same artifact side by side. Per-call overhead is the
round trip of a request that runs nothing, shown next to `launch` of the plan's cheapest call
and that call's synchronized device time; bandwidth is the weights' upload and a KV cache's
download.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tapml.api import artifact_for
from tapml.artifact import Artifact
from tapml.plan import CausalLM
from tapml.targets import backend_for, load_executor
from tapml.targets.remote import open_executor, start_local_agent


def seconds(fn, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_step(executor, steps: int) -> float:
    executor.reset_state()
    task, pos = CausalLM(executor.plan), iter(range(10**6))
    return seconds(lambda: executor.run(*task.decode(next(pos), 42)), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="webgpu")
    parser.add_argument("--quantization", default=None, help="default: as stored (gguf)")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    artifact = artifact_for(args.model, args.target, args.quantization)
    plan, params = Artifact(artifact).plan(), Artifact(artifact).weights()
    local = load_executor(args.target, plan, artifact)
    local.load_params(params)
    backend = backend_for(args.target).name
    with start_local_agent(backend, trust_native_code=backend == "llvm") as url:
        start = time.perf_counter()
        remote = open_executor(url, args.target, plan, artifact)
        load_s = time.perf_counter() - start
        with remote:
            weight_bytes = sum(a.nbytes for a in params.values())
            upload_s = seconds(lambda: remote.load_params(params), 1)
            cache = plan.names("state")[0]
            download_s = seconds(lambda: remote.download(cache), 5)
            function, scalars, _ = CausalLM(plan).decode(1, 42)
            calls = plan.functions[function]["calls"]
            cheapest = min(range(len(calls)), key=lambda i: remote.time_call(function, i, scalars))
            device_s = statistics.median(remote.time_call(function, cheapest, scalars)
                                         for _ in range(20))  # fmt: skip
            launch_s = seconds(lambda: remote.launch(function, cheapest, scalars), 200)
            request_s = seconds(remote.device_info, 200)  # a request that touches no device
            local_step = decode_step(local, args.steps)
            remote_step = decode_step(remote, args.steps)
    print(f"{args.model} {args.target} ({args.quantization}), agent at {url} on {remote.device}")
    print(f"load (plan + kernels, build on the agent): {load_s:.2f} s")
    print(f"upload of the weights: {weight_bytes / 2**20:.1f} MiB in {upload_s:.2f} s = "
          f"{weight_bytes / 2**20 / upload_s:.0f} MiB/s")  # fmt: skip
    nbytes = plan.nbytes(cache)
    print(f"download of {cache}: {nbytes / 2**20:.2f} MiB in {download_s * 1e3:.1f} ms = "
          f"{nbytes / 2**20 / download_s:.0f} MiB/s")  # fmt: skip
    print(f"round trip of a request that runs nothing: {request_s * 1e3:.3f} ms")
    print(f"one call ({calls[cheapest]['kernel']}): launch round trip {launch_s * 1e3:.3f} ms; "
          f"synchronized on the device (time_call) {device_s * 1e3:.3f} ms")
    print(f"decode step: local {local_step * 1e3:.1f} ms, through the agent "
          f"{remote_step * 1e3:.1f} ms ({len(calls)} calls in one round trip)")


if __name__ == "__main__":
    main()
