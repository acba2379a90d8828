"""Speed of a compiled model: prefill and decode tokens/s, memory, and weight-read bandwidth.

`run` measures tapml's engine; `run_llama_cpp` measures llama.cpp (llama-cpp-python) on the
same GGUF and prompt ids in the same process, for `tapml bench --compare`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tapml.artifact import describe
from tapml.convert import bits_per_parameter
from tapml.errors import GenerationError, TapmlError
from tapml.plan import Plan
from tapml.runtime.engine import Engine
from tapml.runtime.sampling import greedy
from tapml.startup import (
    peak_rss_mb,
    probe_llama_cpp,
    probe_tapml,
    reset_peak_rss,
    rss_mb,
)
from tapml.targets.llvm import HostMemory, tvm_threads

BENCH_TEXT = (
    "The history of computing is a story of people who turned ideas into machines, and "
    "machines into tools that changed how everyone works, learns and talks to each other. "
)
LLAMA_CPP_INSTALL = "pip install llama-cpp-python (or: bash scripts/setup.sh --test)"

log = logging.getLogger("tapml")


def prompt_ids(tokenizer, n: int) -> list[int]:
    """`n` prompt ids: BENCH_TEXT's tokens, repeated."""
    ids = tokenizer.encode(BENCH_TEXT)
    return (ids * (n // len(ids) + 1))[:n]


# kernels that read a row of their tables a step: an untied embedding's (`take`, a token's) and
# RoPE's cos and sin (`rope_kv_write`, a position's)
GATHERS = ("take", "rope")


def decode_param_bytes(plan: Plan) -> int:
    """Bytes of the parameters the plan's decode function reads (each buffer counted once). A
    table only gathered from gives a row a step: not counted (GATHERS)."""
    decode = plan.task["decode"]["function"]
    used = {
        plan.root(arg["buffer"])
        for call in plan.functions[decode]["calls"]
        if not any(kind in call["kernel"] for kind in GATHERS)
        for arg in call["args"]
        if "buffer" in arg
    }
    return sum(plan.nbytes(name) for name in used if plan.buffers[name]["kind"] == "param")


def decode_kv_bytes(plan: Plan, first_pos: int, steps: int) -> float:
    """Mean bytes of KV cache that decode steps at positions first_pos.. read: each step
    reads every layer's keys and values of the positions up to its own."""
    per_position = 0
    for name in plan.names("state"):
        # keys [kv_heads, tiles, head_dim, tile], values [kv_heads, max_context, head_dim]
        b = plan.buffers[name]
        per_position += b["shape"][0] * b["shape"][2] * np.dtype(b["dtype"]).itemsize
    mean_positions = first_pos + (steps + 1) / 2
    return per_position * mean_positions


def measure(
    artifact: Path,
    prompt_tokens: int = 256,
    decode_tokens: int = 128,
    compare_gguf: Path | None = None,
) -> dict[str, Any]:
    """Everything `tapml bench` reports: `run` on `artifact`, TVM's thread count, this
    machine's bandwidth on as many threads and, with `compare_gguf`, llama.cpp on that file
    with the same prompt ids and threads, and the ratios tapml / llama.cpp."""
    if compare_gguf is not None:
        import_llama_cpp()  # before minutes of benchmarking, not after
    _warn_if_busy()
    # leave out the peak of compiling the model, if this process did (what compiling left
    # resident still counts: rss_before_mb)
    rss_before = rss_mb()
    reset_peak_rss()
    engine = Engine(artifact)
    ours = run(engine, prompt_tokens, decode_tokens)
    threads = tvm_threads()
    prompt = prompt_ids(engine.tokenizer, prompt_tokens)
    del engine
    result = {key: ours.pop(key) for key in ("decode_tok_s", "prefill_tok_s", "peak_rss_mb",
                                             "bandwidth_gb_s")}  # fmt: skip
    result["machine_bandwidth_gb_s"] = machine_bandwidth_gb_s(threads)
    result["threads"] = threads
    config = describe(artifact)
    result["quantization"] = config["options"]["quantization"]
    result["bits_per_parameter"] = bits_per_parameter(config)
    result["rss_before_mb"] = rss_before
    result.update(ours)
    result.update(startup(probe_tapml(artifact, threads)))
    if compare_gguf is not None:
        theirs = run_llama_cpp(compare_gguf, prompt, decode_tokens, threads)
        theirs.update(startup(probe_llama_cpp(compare_gguf, threads)))
        result["llama_cpp"] = theirs
        result["decode_ratio"] = result["decode_tok_s"] / theirs["decode_tok_s"]
        result["prefill_ratio"] = result["prefill_tok_s"] / theirs["prefill_tok_s"]
        result["load_ttft_ratio"] = ((result["load_s"] + result["ttft_s"])
                                     / (theirs["load_s"] + theirs["ttft_s"]))  # fmt: skip
        result["process_ratio"] = result["process_s"] / theirs["process_s"]
        result["startup_rss_ratio"] = result["startup_rss_mb"] / theirs["startup_rss_mb"]
    _warn_if_busy()  # something may have started meanwhile
    return result


def startup(probe: dict[str, Any]) -> dict[str, Any]:
    """A start-up probe's figures under bench's keys: `load_s` (process start to ready),
    `ttft_s` (a short prompt to its first token), `process_s` (the whole process, generating
    8 tokens) and `startup_rss_mb` (that process's peak RSS)."""
    return {"load_s": probe["load_s"], "ttft_s": probe["ttft_s"],
            "process_s": probe["process_s"], "startup_rss_mb": probe["peak_rss_mb"]}  # fmt: skip


def _warn_if_busy() -> None:
    busy = busy_cores()
    if busy is not None and busy > 0.5:
        # llama.cpp's OpenMP threads spin at barriers: one busy core can slow it 20-fold
        log.warning("other processes keep %.1f cores busy: the figures may be low", busy)


def busy_cores(seconds: float = 0.25) -> float | None:
    """How many cores are busy over `seconds` while this process sleeps (None off Linux)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def source_gguf(model: str) -> Path:
    """The GGUF file behind `model`: a model name, a .gguf path or a compiled artifact."""
    from tapml.artifact import Artifact, describe
    from tapml.models import MODELS, resolve_gguf

    if not Artifact.is_artifact(model):
        return resolve_gguf(model)[1]
    source = describe(Path(model))["model"]["source"]
    for card in MODELS.values():
        if card.filename == source:
            return card.gguf_path()
    raise TapmlError(
        f"{model} was compiled from {source}, which is no model tapml knows by name; to compare "
        "with llama.cpp, pass the model's .gguf path instead of the compiled directory"
    )


def run(engine: Engine, prompt_tokens: int = 256, decode_tokens: int = 128) -> dict[str, Any]:
    """Prefill a `prompt_tokens` prompt, then decode `decode_tokens` greedy tokens.

    `peak_rss_mb` is the process's peak RSS (`reset_peak_rss` before loading the engine leaves
    out what the process held at its peak before, e.g. compiling the model).
    `bandwidth_gb_s` is the parameter bytes one decode step reads times decode steps per second;
    `bandwidth_with_kv_gb_s` adds the KV cache bytes the steps read (on average).
    """
    if prompt_tokens + decode_tokens > engine.max_context:
        raise GenerationError(
            f"{prompt_tokens} prompt + {decode_tokens} decode tokens do not fit the compiled "
            f"context of {engine.max_context}; pass smaller --prompt-tokens/--decode-tokens or "
            "compile with a larger --max-context"
        )
    prompt = prompt_ids(engine.tokenizer, prompt_tokens)
    # warm-up: thread pool start, first-touch page faults of the KV cache and temporaries
    engine.reset()
    engine.decode(greedy(engine.prefill(prompt[: engine.chunk])))
    engine.reset()
    start = time.perf_counter()
    logits = engine.prefill(prompt)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens):
        logits = engine.decode(greedy(logits))
    decode_s = time.perf_counter() - start
    step_bytes = decode_param_bytes(engine.plan)
    kv_bytes = decode_kv_bytes(engine.plan, prompt_tokens, decode_tokens)
    return {
        "prefill_tokens": prompt_tokens,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / decode_s,
        "peak_rss_mb": peak_rss_mb(),
        "decode_bytes_per_token": step_bytes,
        "decode_kv_bytes_per_token": kv_bytes,
        "bandwidth_gb_s": step_bytes * decode_tokens / decode_s / 1e9,
        "bandwidth_with_kv_gb_s": (step_bytes + kv_bytes) * decode_tokens / decode_s / 1e9,
    }


def run_llama_cpp(
    gguf_path: Path, prompt: Sequence[int], decode_tokens: int, threads: int
) -> dict[str, Any]:
    """llama.cpp on `gguf_path`: prefill `prompt` (ids, no BOS added), then `decode_tokens` greedy
    steps, on `threads` threads. `peak_rss_mb` is what llama.cpp added to the process's RSS
    (model, KV cache, compute buffers), or None where the peak cannot be reset."""
    llama_cpp = import_llama_cpp()
    import gguf

    before = rss_mb()
    can_reset = reset_peak_rss()
    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=max(512, len(prompt) + decode_tokens + 1),
        n_batch=max(256, len(prompt)), n_threads=threads, n_threads_batch=threads,
        verbose=False,
    )  # fmt: skip
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return greedy(np.ctypeslib.as_array(logits, shape=(n_vocab,)))

    try:
        llm.reset()  # warm-up, as in `run`
        llm.eval(list(prompt[:32]))
        llm.eval([next_token()])
        llm.reset()
        start = time.perf_counter()
        llm.eval(list(prompt))
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([next_token()])
        decode_s = time.perf_counter() - start
        peak = peak_rss_mb() - before if can_reset else None
    finally:
        llm.close()
    # every tensor is read once per token, token_embd only where it is the output too (else
    # llama.cpp gathers a row of it a token)
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(gguf_path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    step_bytes = sum(tensors.values())
    return {
        "decode_tok_s": decode_tokens / decode_s,
        "prefill_tok_s": len(prompt) / prefill_s,
        "peak_rss_mb": peak,
        "bandwidth_gb_s": step_bytes * decode_tokens / decode_s / 1e9,
        "decode_bytes_per_token": step_bytes,
        "version": llama_cpp.__version__,
    }


def import_llama_cpp():
    """The llama_cpp module, or a TapmlError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise TapmlError(
            f"--compare llama.cpp needs llama-cpp-python ({e}); install it with: "
            f"{LLAMA_CPP_INSTALL}"
        ) from e
    return llama_cpp


def machine_bandwidth_gb_s(threads: int = 1, nbytes: int = 512 * 2**20, repeats: int = 3) -> float:
    """This machine's memory read bandwidth in GB/s: the best of `repeats` passes of each of two
    readers over an `nbytes` array. numpy reads on `threads` threads of its own; a compiled
    kernel reads on TVM's CPU thread pool (the threads decode runs on) and asks for memory
    ahead of its reads, as tapml's GEMVs do. Neither is always the faster: on a shared machine
    numpy reads up to a fifth less in some passes, the kernel a few percent less in others."""
    import tvm

    rows = max(1, nbytes // _PROBE_ROW_BYTES)
    # the memory decode's weights lie in
    data = HostMemory(rows * _PROBE_ROW_BYTES).take(rows * _PROBE_ROW_BYTES)
    data = data._create_view((rows, _PROBE_ROW_BYTES // 4), "float32")
    array = np.from_dlpack(data)
    # ones, not zeros: a calloc'd array of zeros maps one shared zero page until written
    array[...] = 1
    # A max, not a sum: numpy's pairwise float sum is compute-bound at about cache speed.
    parts = np.array_split(array.reshape(-1), threads)
    reader, out = _probe_kernel(rows), tvm.runtime.empty((rows, 16), "float32", tvm.cpu())
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - start)
            start = time.perf_counter()
            reader(data, out)
            best = min(best, time.perf_counter() - start)
    return array.nbytes / best / 1e9


_PROBE_ROW_BYTES = 4096
_PROBE_AHEAD_ROWS = 4  # 16 KiB: anything from 8 to 64 KiB reads as fast (measured)


def _probe_kernel(rows: int):
    """A TVM kernel: out[r] = the lane-wise max of row r of a [rows, 1024] float32 array, rows
    in parallel, each first prefetching the row _PROBE_AHEAD_ROWS ahead."""
    import tvm
    from tvm.script import tirx as T

    from tapml.targets import get_target
    from tapml.targets.llvm_schedules import prefetch

    width, ahead = _PROBE_ROW_BYTES // 4, _PROBE_AHEAD_ROWS

    @T.prim_func
    def read(a: T.Buffer((rows, width), "float32"), out: T.Buffer((rows, 16), "float32")):
        for r in T.parallel(rows):
            if r + ahead < rows:
                for c in range(width // 16):  # one 64-byte line each
                    T.evaluate(prefetch(T.address_of(a[r + ahead, c * 16])))
            for lane in T.vectorized(16):
                out[r, lane] = a[r, lane]
            for c in range(1, width // 16):
                for lane in T.vectorized(16):
                    out[r, lane] = T.max(out[r, lane], a[r, c * 16 + lane])

    target = get_target("llvm").tvm_target()
    return tvm.compile(tvm.IRModule({"main": read}), target=target)["main"]


# -- agreement: which token a model picks, step by step, against another ------------------
AGREEMENT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
    "Die Hauptstadt von Deutschland ist",
]


def greedy_run(engine: Engine, prompt: Sequence[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """The logits predicting each of `steps` greedy tokens after `prompt`, and the tokens."""
    engine.reset()
    logits, tokens = [engine.prefill(list(prompt))], []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(engine.decode(tokens[-1]))
    return np.stack(logits[:-1]), tokens


def llama_cpp_greedy(llm: Any, prompt: Sequence[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """The same with llama.cpp (a `llama_cpp.Llama` made with logits_all=True)."""
    llm.reset()
    llm.eval(list(prompt))
    logits, tokens = [], []
    for _ in range(steps):
        logits.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
        tokens.append(int(np.argmax(logits[-1])))
        llm.eval([tokens[-1]])
    return np.stack(logits), tokens


def forced_logits(engine: Engine, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """The logits after the prompt and after each of `tokens` but the last, fed in turn
    (teacher forcing): [len(tokens), vocab], row i the prediction of tokens[i]."""
    engine.reset()
    logits = [engine.prefill(list(prompt))]
    logits += [engine.decode(t) for t in tokens[:-1]]
    return np.stack(logits)


def llama_cpp_logits(gguf_path: Path, ids: Sequence[int], threads: int = 2) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] after each prefix of `ids` (no BOS added)."""
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(256, len(ids) + 1),
                          logits_all=True, n_threads=threads, verbose=False)  # fmt: skip
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], np.float32)
    finally:
        llm.close()


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """How far the top logit is above the second, per row."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]
