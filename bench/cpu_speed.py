"""tapml vs llama.cpp on this CPU: `tapml bench --json` repeated on 1 and 2 threads for each
weight scheme, medians.

    .venv/bin/python bench/cpu_speed.py [--model smollm2-135m] [--repeats 3] [--threads 1,2]
        [--quantization gguf,q4f32_1]

Each run is a fresh process (TVM's thread pool cannot grow once started), the thread counts
and schemes alternate so that a busy spell on the machine hits all of them, and every run's
figures are kept in the JSON printed last, so the spread shows how noisy the machine was.
With more than one scheme, each scheme's decode and prefill are also given as a ratio to the
first's (the GGUF's own blocks, by default, against tapml's re-quantized q4f32_1). A scheme
`SCHEME+KEY=VALUE...` compiles with `--target-option KEY=VALUE` (e.g.
`gguf+decode=float32,gguf` compares float32 decode with the default, auto, which is int8 on a
CPU with AVX-512 VNNI).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

KEYS = ("decode_tok_s", "prefill_tok_s", "bandwidth_gb_s")


def bench_once(model: str, threads: int, scheme: str) -> dict:
    quantization, *options = scheme.split("+")
    out = subprocess.run(
        [sys.executable, "-m", "tapml", "-q", "bench", model, "--threads", str(threads),
         "--quantization", quantization, "--compare", "llama.cpp", "--json",
         *(arg for option in options for arg in ("--target-option", option))],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--quantization", default="gguf,q4f32_1",
                        help="schemes, comma-separated; ratios are to the first")  # fmt: skip
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    schemes = args.quantization.split(",")
    runs: dict[tuple[int, str], list[dict]] = {(t, q): [] for t in counts for q in schemes}
    for i in range(args.repeats):
        for t in counts:
            for q in schemes:
                runs[t, q].append(bench_once(args.model, t, q))
                r = runs[t, q][-1]
                theirs = r["llama_cpp"]
                print(f"run {i + 1} threads {t} {q}: decode {r['decode_tok_s']:.1f} vs "
                      f"{theirs['decode_tok_s']:.1f}, prefill {r['prefill_tok_s']:.1f} vs "
                      f"{theirs['prefill_tok_s']:.1f} tok/s", file=sys.stderr)  # fmt: skip
    print(f"\n{'threads':>7} {'':17} {'decode tok/s':>12} {'prefill tok/s':>13} {'GB/s':>6} "
          f"{'bits/param':>10}")  # fmt: skip
    summary: dict[str, dict] = {}
    for t in counts:
        medians = {}
        for q in schemes:
            rs = runs[t, q]
            ours = {k: statistics.median(r[k] for r in rs) for k in KEYS}
            theirs = {k: statistics.median(r["llama_cpp"][k] for r in rs) for k in KEYS}
            machine = statistics.median(r["machine_bandwidth_gb_s"] for r in rs)
            ratios = {k: statistics.median(r[k] for r in rs)
                      for k in ("decode_ratio", "prefill_ratio")}  # fmt: skip
            bits = rs[0]["bits_per_parameter"]
            print(f"{t:7d} {'tapml ' + q:17} {ours['decode_tok_s']:12.1f} "
                  f"{ours['prefill_tok_s']:13.1f} {ours['bandwidth_gb_s']:6.1f} {bits:10.2f}")
            print(f"{'':7} {'  / llama.cpp':17} {ratios['decode_ratio']:11.2f}x "
                  f"{ratios['prefill_ratio']:12.2f}x (llama.cpp {theirs['decode_tok_s']:.1f} "
                  f"and {theirs['prefill_tok_s']:.1f} tok/s)")  # fmt: skip
            # each run's decode against the bandwidth measured in that run, then the median
            shares = {key: statistics.median(r[key] / r["machine_bandwidth_gb_s"] for r in rs)
                      for key in ("bandwidth_gb_s", "bandwidth_with_kv_gb_s")}  # fmt: skip
            print(
                f"{'':7}   decode reads at {shares['bandwidth_gb_s']:.0%} of the machine's "
                f"bandwidth (weights), {shares['bandwidth_with_kv_gb_s']:.0%} (weights and KV "
                f"cache; machine {machine:.1f} GB/s)"
            )
            medians[q] = ours
            summary[f"{t}/{q}"] = {
                "tapml": ours, "llama_cpp": theirs, "machine_bandwidth_gb_s": machine,
                **ratios, "bits_per_parameter": bits, "bandwidth_share": shares["bandwidth_gb_s"],
                "bandwidth_with_kv_share": shares["bandwidth_with_kv_gb_s"], "runs": rs,
            }  # fmt: skip
        first = schemes[0]
        for q in schemes[1:]:
            decode = medians[first]["decode_tok_s"] / medians[q]["decode_tok_s"]
            prefill = medians[first]["prefill_tok_s"] / medians[q]["prefill_tok_s"]
            print(f"{'':7} {first} / {q}: decode {decode:.2f}x, prefill {prefill:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
