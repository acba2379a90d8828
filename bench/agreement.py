"""Which tokens a compiled model picks, step by step, against llama.cpp and q0f32 on the same GGUF.

    .venv/bin/python bench/agreement.py [--model smollm2-135m] [--target llvm,webgpu,...]
        [--quantization gguf] [--tokens 32]

On each of five prompts (`tapml.bench.AGREEMENT_PROMPTS`) q0f32 on llvm (the GGUF's weights
dequantized exactly) continues greedily; each target's model, fed that continuation, picks a
token at every step, and so does llama.cpp (llama-cpp-python). A step counts where the
reference's top two logits are more than the margin apart (0.5 for llama.cpp, 0.01 for
q0f32); every step where the model parts from a reference is listed, with both margins.
Then each scheme's own greedy text on the prompts, and llama.cpp's, side by side.
"""

from __future__ import annotations

import argparse

import numpy as np

from tapml.api import ensure_compiled
from tapml.bench import (
    AGREEMENT_PROMPTS,
    forced_logits,
    greedy_run,
    llama_cpp_logits,
    source_gguf,
    top2_margin,
)
from tapml.runtime.engine import Engine
from tapml.targets import TARGETS, executes_here

MARGINS = {"llama.cpp": 0.5, "q0f32": 0.01}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="llvm,webgpu,vulkan,opencl")
    parser.add_argument("--quantization", default="gguf")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    gguf = source_gguf(args.model)
    reference = Engine(ensure_compiled(args.model, "llvm", "q0f32", kv_cache="float32"))
    runs = []
    for text in AGREEMENT_PROMPTS:
        ids = reference.tokenizer.encode(text)
        logits, tokens = greedy_run(reference, ids, args.tokens)
        llama = llama_cpp_logits(gguf, ids + tokens)[len(ids) - 1 : len(ids) - 1 + len(tokens)]
        runs.append((text, ids, tokens, {"q0f32": logits, "llama.cpp": llama}))

    for target in args.target.split(","):
        ok, why = executes_here(TARGETS[target])
        if not ok:
            print(f"\n{target}: not executed here ({why})")
            continue
        engine = Engine(ensure_compiled(args.model, target, args.quantization,
                                        kv_cache="float32"))  # fmt: skip
        print(f"\n{target} ({args.quantization}): steps where the reference's margin counts, "
              "and how many agree")  # fmt: skip
        totals = {name: [0, 0] for name in MARGINS}
        for text, ids, tokens, refs in runs:
            ours = forced_logits(engine, ids, tokens)
            line = []
            for name, ref in refs.items():
                counted = top2_margin(ref) > MARGINS[name]
                agree = ours.argmax(-1) == ref.argmax(-1)
                totals[name][0] += int(counted.sum())
                totals[name][1] += int((counted & agree).sum())
                line.append(f"{name} {int((counted & agree).sum())}/{int(counted.sum())}")
                for step in np.flatnonzero(~agree):
                    print(f"    {text[:30]!r} step {step}: ours {ours[step].argmax()} (margin "
                          f"{top2_margin(ours[step]):.3f}), {name} {ref[step].argmax()} "
                          f"(margin {top2_margin(ref[step]):.3f})")  # fmt: skip
            print(f"  {text[:40]!r:44} {', '.join(line)}")
        print("  all five: " + ", ".join(f"{n} {a}/{c}" for n, (c, a) in totals.items()))

    print("\ngreedy text, 12 tokens (llvm):")
    schemes = {q: Engine(ensure_compiled(args.model, "llvm", q)) for q in ("gguf", "q4f32_1")}
    for text, ids, tokens, _ in runs:
        print(f"  {text!r}")
        print(f"    {'q0f32':9} {reference.tokenizer.decode(tokens[:12])!r}")
        llama_ids = [int(np.argmax(llama_cpp_logits(gguf, ids)[-1]))]
        for _ in range(11):
            llama_ids.append(int(np.argmax(llama_cpp_logits(gguf, ids + llama_ids)[-1])))
        print(f"    {'llama.cpp':9} {reference.tokenizer.decode(llama_ids)!r}")
        for q, engine in schemes.items():
            print(f"    {q:9} {engine.tokenizer.decode(greedy_run(engine, ids, 12)[1])!r}")


if __name__ == "__main__":
    main()
