"""Speed of a compiled model: prefill and decode tokens/s, measured on the real runtime."""

from __future__ import annotations

import resource
import time
from typing import Any

from tapml.runtime.engine import Engine
from tapml.runtime.sampling import greedy

BENCH_TEXT = (
    "The history of computing is a story of people who turned ideas into machines, and "
    "machines into tools that changed how everyone works, learns and talks to each other. "
)


def run(engine: Engine, prompt_tokens: int = 256, decode_tokens: int = 128) -> dict[str, Any]:
    """Prefill a `prompt_tokens` prompt, then decode `decode_tokens` greedy tokens."""
    ids = engine.tokenizer.encode(BENCH_TEXT)
    prompt = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    engine.reset()
    start = time.perf_counter()
    logits = engine.prefill(prompt)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens):
        logits = engine.decode(greedy(logits))
    decode_s = time.perf_counter() - start
    return {
        "prefill_tokens": prompt_tokens,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / decode_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
