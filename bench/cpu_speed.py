"""tapml vs llama.cpp on this CPU: `tapml bench --json` repeated on 1 and 2 threads, medians.

    .venv/bin/python bench/cpu_speed.py [--model smollm2-135m] [--repeats 3] [--threads 1,2]

Each run is a fresh process (TVM's thread pool cannot grow once started), the thread counts
alternate so that a busy spell on the machine hits both, and every run's figures are kept in
the JSON printed last, so the spread shows how noisy the machine was.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

KEYS = ("decode_tok_s", "prefill_tok_s", "bandwidth_gb_s")


def bench_once(model: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tapml", "-q", "bench", model, "--threads", str(threads),
         "--compare", "llama.cpp", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    runs: dict[int, list[dict]] = {t: [] for t in counts}
    for i in range(args.repeats):
        for t in counts:
            runs[t].append(bench_once(args.model, t))
            r = runs[t][-1]
            print(f"run {i + 1} threads {t}: decode {r['decode_tok_s']:.1f} vs "
                  f"{r['llama_cpp']['decode_tok_s']:.1f}, prefill {r['prefill_tok_s']:.1f} vs "
                  f"{r['llama_cpp']['prefill_tok_s']:.1f} tok/s", file=sys.stderr)  # fmt: skip
    print(f"\n{'threads':>7} {'':9} {'decode tok/s':>12} {'prefill tok/s':>13} {'GB/s':>6}")
    summary = {}
    for t in counts:
        ours = {k: statistics.median(r[k] for r in runs[t]) for k in KEYS}
        theirs = {k: statistics.median(r["llama_cpp"][k] for r in runs[t]) for k in KEYS}
        machine = statistics.median(r["machine_bandwidth_gb_s"] for r in runs[t])
        ratios = {k: statistics.median(r[k] for r in runs[t])
                  for k in ("decode_ratio", "prefill_ratio")}  # fmt: skip
        for name, row in (("tapml", ours), ("llama.cpp", theirs)):
            print(f"{t:7d} {name:9} {row['decode_tok_s']:12.1f} {row['prefill_tok_s']:13.1f} "
                  f"{row['bandwidth_gb_s']:6.1f}")  # fmt: skip
        print(f"{'':7} {'ratio':9} {ratios['decode_ratio']:12.2f} {ratios['prefill_ratio']:13.2f} "
              f"(machine {machine:.1f} GB/s)")  # fmt: skip
        # each run's decode against the bandwidth measured in that run, then the median
        shares = {key: statistics.median(r[key] / r["machine_bandwidth_gb_s"] for r in runs[t])
                  for key in ("bandwidth_gb_s", "bandwidth_with_kv_gb_s")}  # fmt: skip
        print(
            f"{'':7} decode reads at {shares['bandwidth_gb_s']:.0%} of the machine's bandwidth "
            f"(weights), {shares['bandwidth_with_kv_gb_s']:.0%} (weights and KV cache)"
        )
        summary[t] = {"tapml": ours, "llama_cpp": theirs, "machine_bandwidth_gb_s": machine,
                      **ratios, "bandwidth_share": shares["bandwidth_gb_s"],
                      "bandwidth_with_kv_share": shares["bandwidth_with_kv_gb_s"],
                      "runs": runs[t]}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
