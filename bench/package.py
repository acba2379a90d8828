"""Bundle figures: weight bits per parameter, and a web bundle's load time and decode speed in
headless Chromium.

    .venv/bin/python bench/package.py [--model smollm2-135m] [--tokens 4] [--json]

Bits per parameter are over the matrices (every linear layer and the embedding, scales
included; tapml's 4 bits plus one scale per 32 weights is 4.5 with float16 scales and 5.0
with float32 ones), for the GGUF's own blocks and each re-quantizing scheme, with the whole
weight files' bytes beside them. Chromium runs WebGPU on SwiftShader where there is no GPU,
so its speeds are regression figures for this machine only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tapml.api import ensure_compiled
from tapml.artifact import Artifact
from tapml.convert import bits_per_parameter
from tapml.package import package

PROMPT = "The capital of France is"


def weight_bits(model: str) -> dict[str, dict[str, float]]:
    figures = {}
    for quantization in ("gguf", "q4f16_1", "q4f32_1"):
        # the weights do not depend on the target; opencl compiles every scheme here
        artifact = Artifact(ensure_compiled(model, "opencl", quantization, progress=False))
        index = json.loads((artifact.weights_dir / "index.json").read_text())
        figures[quantization] = {
            "matrices": bits_per_parameter(artifact.config),
            "weight_files_mb": sum(t["nbytes"] for t in index["tensors"]) / 1e6,
        }
    return figures


def browser_figures(model: str, tokens: int) -> dict[str, float]:
    from tapml.browser import Browser

    with tempfile.TemporaryDirectory() as tmp:
        bundle = package(model, "webgpu", Path(tmp) / "web", progress=False).path
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
               "chromium": browser_figures(args.model, args.tokens)}  # fmt: skip
    if args.json:
        json.dump(figures, sys.stdout, indent=1)
        print()
        return
    for quantization, bits in figures["bits_per_parameter"].items():
        print(f"{quantization}: {bits['matrices']:.3f} bits/parameter in the matrices; weight "
              f"files {bits['weight_files_mb']:.1f} MB")  # fmt: skip
    b = figures["chromium"]
    print(f"chromium (as stored): load {b['load_s']:.1f} s (weights {b['weights_s']:.1f} s, "
          f"kernels {b['kernels_s']:.1f} s); prefill {b['prompt_tokens']} tokens "
          f"{b['prefill_s']:.1f} s; decode {b['decode_tok_s']:.3f} tok/s "
          f"over {b['decode_tokens']} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
