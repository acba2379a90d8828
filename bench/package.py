"""Bundle figures: weight bits per parameter, and a web bundle's load time and decode speed in
headless Chromium.

    .venv/bin/python bench/package.py [--model smollm2-135m] [--tokens 4] [--json]

Bits per parameter are over the quantized tensors (every linear layer and the embedding,
scales included; 4 bits plus one scale per 32 weights is 4.5 with float16 scales and 5.0 with
float32 ones) and over every weight file byte. Chromium runs WebGPU on SwiftShader where there
is no GPU, so its speeds are regression figures for this machine only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tapml.api import ensure_compiled
from tapml.package import bits_per_parameter, package

PROMPT = "The capital of France is"


def weight_bits(model: str) -> dict[str, dict[str, float]]:
    figures = {}
    for quantization in ("q4f16_1", "q4f32_1"):
        # the weights do not depend on the target; opencl compiles both quantizations here
        artifact = ensure_compiled(model, "opencl", quantization, progress=False)
        index = json.loads((artifact / "weights" / "index.json").read_text())
        quantized = bits_per_parameter(artifact)
        params = sum(_count(t) for t in index["tensors"] if not t["name"].startswith("rope."))
        nbytes = sum(t["nbytes"] for t in index["tensors"] if not t["name"].startswith("rope."))
        figures[quantization] = {"quantized_tensors": quantized,
                                 "all_weights": 8 * nbytes / params}  # fmt: skip
    return figures


def _count(tensor: dict) -> int:
    """Model parameters a stored tensor encodes (8 per packed uint32 word, none for scales)."""
    n = 1
    for d in tensor["shape"]:
        n *= d
    if tensor["name"].endswith(".q_weight"):
        return 8 * n
    return 0 if tensor["name"].endswith(".q_scale") else n


def browser_figures(model: str, tokens: int) -> dict[str, float]:
    from tapml.browser import Browser

    with tempfile.TemporaryDirectory() as tmp:
        bundle = package(model, "webgpu", Path(tmp) / "web", "q4f32_1", progress=False).path
        with Browser(bundle, timeout=900) as page:
            page.open()
            stats = page.evaluate("(async () => (await window.tapml.ready).stats)()")
            generate = f"""(async () => {{
              const e = await window.tapml.ready, ids = [];
              for await (const t of e.generateIds(e.tokenizer.encode({json.dumps(PROMPT)}),
                                                  {{ maxTokens: {tokens + 1} }})) ids.push(t);
              return {{ ...e.stats, ids }};
            }})()"""
            run = page.evaluate(generate)
    return {
        "load_s": stats["load_ms"] / 1e3,
        "weights_s": stats["weights_ms"] / 1e3,
        "kernels_s": stats["kernels_ms"] / 1e3,
        "prefill_s": run["prefill_ms"] / 1e3,
        "prompt_tokens": run["prompt_tokens"],
        "decode_tok_s": run["decode_tokens"] / (run["decode_ms"] / 1e3),
        "decode_tokens": run["decode_tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=4, help="decode steps timed in Chromium")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = {"bits_per_parameter": weight_bits(args.model),
               "chromium_q4f32_1": browser_figures(args.model, args.tokens)}  # fmt: skip
    if args.json:
        json.dump(figures, sys.stdout, indent=1)
        print()
        return
    for quantization, bits in figures["bits_per_parameter"].items():
        print(f"{quantization}: {bits['quantized_tensors']:.3f} bits/parameter in quantized "
              f"tensors, {bits['all_weights']:.3f} over all weights")  # fmt: skip
    b = figures["chromium_q4f32_1"]
    print(f"chromium (q4f32_1): load {b['load_s']:.1f} s (weights {b['weights_s']:.1f} s, "
          f"kernels {b['kernels_s']:.1f} s); prefill {b['prompt_tokens']} tokens "
          f"{b['prefill_s']:.1f} s; decode {b['decode_tok_s']:.3f} tok/s "
          f"over {b['decode_tokens']} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
