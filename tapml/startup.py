"""Where start-up goes: each stage of loading a model logged with its seconds (`tapml -v`),
the process's resident memory, and start-up measured in fresh processes for `tapml bench`,
tapml's and llama.cpp's alike.

A probe is a fresh Python process that loads a model, generates a few greedy tokens from a
short prompt and prints one JSON line: `load_s` (process start to ready), `ttft_s` (the
prompt given to the first token), `peak_rss_mb`; its parent times the whole process.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import TapmlError

log = logging.getLogger("tapml")

PROBE_PROMPT = "The capital of France is"
PROBE_TOKENS = 8
PROBE_CONTEXT = 2048  # llama.cpp's context in the probe, as tapml compiles by default
_IMPORTED = time.perf_counter()
_last_mark: float | None = None


def since_process_start() -> float:
    """Seconds since this process started (Linux, to 10 ms; elsewhere since tapml loaded)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - started / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def mark(stage: str) -> None:
    """Log (at debug level: `tapml -v`) that `stage` is done, with the seconds it took since
    the previous mark and since the process started, and the memory resident then."""
    global _last_mark
    now = since_process_start()
    took = now - (_last_mark or 0.0)
    _last_mark = now
    log.debug("start-up: %-12s %6.3f s, done %.3f s after the process started; resident "
              "memory %.0f MiB", stage, took, now, rss_mb())  # fmt: skip


# -- memory --------------------------------------------------------------------------
def rss_mb() -> float:
    """The process's resident memory now, in MiB (Linux; elsewhere its peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident memory, in MiB (since `reset_peak_rss`, on Linux)."""
    # VmHWM: the figure that `reset_peak_rss` resets
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024  # bytes on macOS


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False where it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# -- probes: fresh processes ---------------------------------------------------------------
def probe_tapml(artifact: Path, threads: int) -> dict[str, Any]:
    """Start-up of tapml on a compiled artifact, in a fresh process (`tapml.load`)."""
    return _probe("tapml", str(artifact), threads)


def probe_llama_cpp(gguf_path: Path, threads: int) -> dict[str, Any]:
    """Start-up of llama.cpp (llama-cpp-python) on a GGUF, in a fresh process: `Llama(path,
    n_ctx=2048)`, then one streamed completion."""
    return _probe("llama.cpp", str(gguf_path), threads)


def _probe(runner: str, model: str, threads: int) -> dict[str, Any]:
    code = "import sys; from tapml.startup import _child; _child(*sys.argv[1:])"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, runner, model, str(threads)],
                          capture_output=True, text=True)  # fmt: skip
    process_s = time.perf_counter() - start
    if done.returncode != 0:
        raise TapmlError(f"the {runner} start-up probe failed (exit {done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}")  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["ttft_s"] is None:
        raise TapmlError(f"the {runner} start-up probe generated no token from "
                         f"{PROBE_PROMPT!r} (it stopped at once)")  # fmt: skip
    result["process_s"] = process_s
    return result


def _child(runner: str, model: str, threads: str) -> None:
    """The probe process: load, generate PROBE_TOKENS, print the figures as one JSON line."""
    load = _load_tapml if runner == "tapml" else _load_llama_cpp
    stream = load(model, int(threads))
    load_s = since_process_start()
    start = time.perf_counter()
    tokens, ttft_s = 0, None  # None: no token came
    for _ in stream():
        tokens += 1
        if tokens == 1:
            ttft_s = time.perf_counter() - start
    print(json.dumps({"load_s": load_s, "ttft_s": ttft_s, "tokens": tokens,
                      "total_s": since_process_start(), "peak_rss_mb": peak_rss_mb()}))  # fmt: skip


def _load_tapml(artifact: str, threads: int):
    from tapml.targets.llvm import use_threads

    use_threads(threads)
    from tapml.api import load

    engine = load(artifact, progress=False)
    ids = engine.tokenizer.encode(PROBE_PROMPT)
    return lambda: engine.generate_ids(ids, max_tokens=PROBE_TOKENS)


def _load_llama_cpp(gguf_path: str, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=PROBE_CONTEXT, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # fmt: skip
    return lambda: llm.create_completion(PROBE_PROMPT, max_tokens=PROBE_TOKENS, temperature=0.0,
                                         stream=True)  # fmt: skip
