"""Serving under load: `tapml serve` against llama-cpp-python's OpenAI server on the same GGUF
and threads, with 1, 4 and 16 concurrent streaming clients, in one run.

    .venv/bin/python bench/serve.py [--model smollm2-135m] [--threads 2] [--clients 1 4 16]
                                    [--seconds 30] [--max-tokens 64] [--json]

Each server is a fresh process on a free loopback port, started, loaded and warmed up (one
request) before it is measured, and stopped before the other starts. llama.cpp runs as
`python -m llama_cpp.server --n_ctx 2048 --n_threads T --n_threads_batch T
--interrupt_requests False`, so that it serves requests one at a time, in order, as tapml
does. Each client streams chat completions (greedy, a question of its own each time) one
after another for `--seconds`; a request started in time is waited for. Reported per
server and concurrency: tokens per second in total and per client (content chunks of the
streams, which both servers send a token at a time), time to the first token p50 and p99,
and requests refused. Needs the bench extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MODEL_NAME = "bench"


def start(command: list[str], ready_line: bool) -> tuple[subprocess.Popen, int]:
    """A server process and its port: from its first stdout line (tapml), or a port chosen here
    and polled until it answers (llama.cpp)."""
    port = 0 if ready_line else _free_port()
    command = [c.replace("{port}", str(port)) for c in command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)  # fmt: skip
    if ready_line:
        line = process.stdout.readline().strip()
        if not line.startswith("http://"):
            process.kill()
            raise SystemExit(f"tapml serve did not start: {line!r}")
        return process, int(line.rsplit(":", 1)[1].split("/")[0])
    for _ in range(600):
        try:
            if _get(port, "/v1/models")[0] == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("llama_cpp.server did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def stream_chat(port: int, question: str, max_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat completion: its status, seconds to the first token and in all,
    and the tokens it streamed."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return {"status": response.status}
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                tokens += 1
                if first is None:
                    first = time.perf_counter() - start
    finally:
        conn.close()
    return {"status": 200, "ttft": first, "tokens": tokens,
            "seconds": time.perf_counter() - start}  # fmt: skip


def load(port: int, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """`clients` threads streaming one request after another for `seconds`."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(c: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            result = stream_chat(port, f"Tell me something about the number {c * 1000 + n}.",
                                 max_tokens)  # fmt: skip
            n += 1
            with lock:
                results.append(result)
            if result["status"] != 200:
                time.sleep(0.5)  # refused: ask again a little later, as a client would

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    served = [r for r in results if r["status"] == 200]
    ttfts = sorted(r["ttft"] for r in served if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in served)
    return {
        "clients": clients, "requests": len(served), "tokens": tokens,
        "tok_s": tokens / wall, "tok_s_per_client": tokens / wall / clients,
        "ttft_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))] if ttfts else None,
        "refused": len(results) - len(served),
    }  # fmt: skip


def commands(model: str, gguf: Path, threads: int) -> dict[str, tuple[list[str], bool]]:
    tapml = [sys.executable, "-m", "tapml", "-q", "serve", model, "--port", "0", "--name",
             MODEL_NAME, "--threads", str(threads), "--max-queue", "64"]  # fmt: skip
    llama = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
             MODEL_NAME, "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", "2048",
             "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--interrupt_requests", "False"]  # fmt: skip
    return {"tapml": (tapml, True), "llama.cpp": (llama, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a zoo model with a GGUF")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tapml.api import ensure_compiled
    from tapml.models import MODELS

    ensure_compiled(args.model, "llvm")  # compiled before any clock starts
    rows = []
    for server, (command, ready_line) in commands(args.model, MODELS[args.model].gguf_path(),
                                                  args.threads).items():  # fmt: skip
        process, port = start(command, ready_line)
        try:
            stream_chat(port, "Warm up.", 8)
            for clients in args.clients:
                row = {"server": server, **load(port, clients, args.seconds, args.max_tokens)}
                rows.append(row)
                if not args.json:
                    print(_line(row), file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(30)
    report = {"model": args.model, "threads": args.threads, "seconds": args.seconds,
              "max_tokens": args.max_tokens, "cpus": os.cpu_count(), "rows": rows,
              "ratios": _ratios(rows)}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for clients, ratio in report["ratios"].items():
            print(f"{clients:>3} clients: tapml/llama.cpp tokens/s {ratio['tok_s']:.2f}x, "
                  f"TTFT p99 {ratio['ttft_p99']:.2f}x")


def _line(row: dict[str, Any]) -> str:
    def ms(v):
        return f"{v * 1000:7.0f} ms" if v is not None else "      -   "

    return (f"{row['server']:>9} {row['clients']:>3} clients: {row['tok_s']:6.1f} tok/s "
            f"({row['tok_s_per_client']:5.1f} per client), TTFT p50 {ms(row['ttft_p50'])} "
            f"p99 {ms(row['ttft_p99'])}, {row['requests']} requests, {row['refused']} refused")


def _ratios(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """tapml's figures over llama.cpp's, per concurrency (tokens/s: above 1 is better; TTFT:
    below 1 is better)."""
    by = {(r["server"], r["clients"]): r for r in rows}
    out = {}
    for (server, clients), row in by.items():
        peer = by.get(("llama.cpp", clients))
        if server == "tapml" and peer and peer["tok_s"] and peer["ttft_p99"]:
            out[clients] = {"tok_s": row["tok_s"] / peer["tok_s"],
                            "ttft_p99": row["ttft_p99"] / peer["ttft_p99"]}  # fmt: skip
    return out


if __name__ == "__main__":
    main()
