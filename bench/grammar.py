"""Grammar-constrained decoding: per-token mask time per backend, and the slowdown it costs.

    .venv/bin/python bench/grammar.py [--model smollm2-135m] [--quantization Q]

For each JSON schema, the real model answers a chat prompt greedily three ways: unconstrained
(as many tokens as the longer constrained reply, stop tokens ignored) and under each backend's
constraint; each reply runs --repeats times and the fastest counts (the machine may be busy).
Per generated token it times `mask` (the backend's bitmask, then numpy unpacking it onto a
float32 logits copy) and the whole grammar step (`mask` + `accept` + `is_complete`).
`is_complete` computes the next mask ahead when the grammar may end, so the grammar step is the
fair per-token cost.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tapml.api import ensure_compiled
from tapml.runtime.engine import Engine
from tapml.runtime.grammar import BACKENDS, make_constraint

MAX_TOKENS = 48
NAME = {"type": "string", "maxLength": 12}


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    required = list(properties) if required is None else required
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


SCHEMAS = [
    ("Give a person named Alice, 30 years old.",
     _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("List three fruits.", _obj({"fruits": {"type": "array", "items": NAME, "maxItems": 3}})),
    ("Describe a user with an address.",
     _obj({"user": _obj({"name": NAME, "address": _obj({"city": NAME, "zip": {
         "type": "string", "pattern": "^[0-9]{5}$"}})})})),
    ("List up to two cities with their populations.",
     _obj({"cities": {"type": "array", "maxItems": 2, "items": _obj({
         "name": NAME, "millions": {"type": "integer", "minimum": 0, "maximum": 40}})}})),
    ("Is 7 a prime number? Answer with a reason.",
     _obj({"prime": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 20}})),
    ("Give a date.",
     _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}})),
]  # fmt: skip


def prompt_ids(engine: Engine, prompt: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return engine.tokenizer.encode(text)


def constrained(engine: Engine, ids: list[int], constraint, timings: dict) -> tuple[int, float]:
    """Greedy tokens under `constraint`; (tokens, loop seconds); appends per-token seconds."""
    engine.reset()
    logits, n = engine.prefill(ids), 0
    start = time.perf_counter()
    for _ in range(MAX_TOKENS):
        t0 = time.perf_counter()
        masked = constraint.mask(logits)
        t1 = time.perf_counter()
        token = int(np.argmax(masked))
        t2 = time.perf_counter()
        constraint.accept(token)
        done = token in engine.tokenizer.stop_ids or constraint.is_complete()
        t3 = time.perf_counter()
        timings["mask"].append(t1 - t0)
        timings["grammar"].append((t1 - t0) + (t3 - t2))
        n += 1
        if done:
            break
        logits = engine.decode(token)
    return n, time.perf_counter() - start


def unconstrained(engine: Engine, ids: list[int], steps: int) -> float:
    """Seconds for `steps` greedy tokens (the same loop, no constraint)."""
    engine.reset()
    logits = engine.prefill(ids)
    start = time.perf_counter()
    for i in range(steps):
        token = int(np.argmax(logits))
        if i + 1 < steps:
            logits = engine.decode(token)
    return time.perf_counter() - start


def apply_only(constraint, vocab_size: int, repeats: int = 200) -> list[float]:
    """Seconds of `mask` alone once the backend's bitmask is computed: numpy's share."""
    logits = np.random.default_rng(0).standard_normal(vocab_size).astype(np.float32)
    constraint.allowed()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        constraint.mask(logits)
        times.append(time.perf_counter() - t0)
    return times


def us(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default=None, help="default: as stored (gguf)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    engine = Engine(ensure_compiled(args.model, "llvm", args.quantization))
    tokenizer = engine.tokenizer
    for backend in BACKENDS:  # tokenizer info and imports, outside the timings
        make_constraint("any_json", None, tokenizer, backend)

    timings = {b: {"mask": [], "grammar": [], "compile": []} for b in BACKENDS}
    tokens = dict.fromkeys([*BACKENDS, "none"], 0)
    seconds = dict.fromkeys([*BACKENDS, "none"], 0.0)
    for prompt, schema in SCHEMAS:
        ids, best = prompt_ids(engine, prompt), {}
        for _ in range(args.repeats):
            for backend in BACKENDS:
                t0 = time.perf_counter()
                c = make_constraint("json_schema", json.dumps(schema), tokenizer, backend)
                timings[backend]["compile"].append(time.perf_counter() - t0)
                n, s = constrained(engine, ids, c, timings[backend])
                best[backend] = min(best.get(backend, (n, s)), (n, s), key=lambda r: r[1])
            steps = max(n for n, _ in best.values())
            s = unconstrained(engine, ids, steps)
            best["none"] = min(best.get("none", (steps, s)), (steps, s), key=lambda r: r[1])
        for mode, (n, s) in best.items():
            tokens[mode] += n
            seconds[mode] += s

    apply = apply_only(make_constraint("any_json", None, tokenizer), tokenizer.vocab_size)
    print(f"{len(SCHEMAS)} JSON schemas, {args.model} {args.quantization} on llvm, greedy\n")
    print(f"{'backend':11} {'mask us':>16} {'grammar step us':>16} {'compile ms':>11}")
    print(f"{'':11} {'median    p99':>16} {'median    p99':>16} {'median':>11}")
    for backend, t in timings.items():
        print(
            f"{backend:11} {us(t['mask'], 50):7.0f} {us(t['mask'], 99):7.0f}  "
            f"{us(t['grammar'], 50):7.0f} {us(t['grammar'], 99):7.0f}  "
            f"{np.median(t['compile']) * 1e3:10.1f}"
        )
    print(f"numpy share of mask (bitmask -> -inf on a float32 copy): median {us(apply, 50):.0f} us")
    base = tokens["none"] / seconds["none"]
    print(f"\n{'decode':11} {'tokens':>7} {'tok/s':>8} {'slowdown':>9}")
    print(f"{'none':11} {tokens['none']:7d} {base:8.1f} {1.0:8.2f}x")
    for backend in BACKENDS:
        rate = tokens[backend] / seconds[backend]
        print(f"{backend:11} {tokens[backend]:7d} {rate:8.1f} {base / rate:8.2f}x")


if __name__ == "__main__":
    main()
