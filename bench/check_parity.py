"""Does TARGET compute what llvm computes? Teacher-forced parity on the real model.

Both engines read the same tokens: the prompt, then llvm's greedy continuation. Per step it
prints the max relative logit error (max |TARGET - llvm| / max |llvm|) and each engine's
greedy token; it exits 1 when a greedy token differs, a logit is not finite or an error is
over the tolerance, 2 when TARGET cannot run here.

    .venv/bin/python bench/check_parity.py cuda --quantization q4f16_1
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

# max |TARGET - llvm| / max |llvm| at any step: float32 kernels differ only in summation order
# and math library rounding; float16 ones round every intermediate on both sides (llvm's
# q4f16_1 logits are 1-3e-3 off a float32 pass on SmolLM2-135M: the limit is ~6x that).
TOLERANCE = {"float32": 1e-3, "float16": 2e-2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="the target to check against llvm, e.g. cuda or metal")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", "-q", help="default: the target's default")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=16, help="greedy steps to compare")
    parser.add_argument("--tolerance", type=float, help="default: by activation dtype")
    args = parser.parse_args(argv)

    from tapml.api import ensure_compiled
    from tapml.errors import ExecutorError
    from tapml.quantization import get_quantization
    from tapml.runtime.engine import Engine
    from tapml.targets import get_target

    quant = get_quantization(args.quantization or get_target(args.target).default_quantization)
    tolerance = args.tolerance or TOLERANCE[quant.dtype]
    print(f"{args.model} {quant.name}: {args.target} against llvm, {args.tokens} teacher-forced "
          f"steps, tolerance {tolerance:g} (max relative logit error)", flush=True)  # fmt: skip
    engines = []  # (name, engine): llvm first; a list, so that llvm can be checked too
    for target in ("llvm", args.target):
        start = time.perf_counter()
        artifact = ensure_compiled(args.model, target, quant.name,
                                   target_options=get_target(target).reference_options())
        try:
            engines.append((target, Engine(artifact)))
        except ExecutorError as e:
            print(f"cannot run {target} here: {e}", file=sys.stderr)
            return 2
        print(f"{target}: {artifact} ready in {time.perf_counter() - start:.1f}s", flush=True)
    ref = engines[0][1]
    ids = ref.tokenizer.encode(args.prompt)
    seconds = [0.0, 0.0]

    def step_all(token: int | None) -> list[np.ndarray]:
        """Each engine's next logits: after the prompt (None), else after `token`."""
        out = []
        for i, (_, engine) in enumerate(engines):
            start = time.perf_counter()
            out.append(engine.prefill(ids) if token is None else engine.decode(token))
            seconds[i] += (time.perf_counter() - start) * (token is not None)
        return out

    for _, engine in engines:
        engine.reset()
    r, t = step_all(None)
    failures, ref_tokens, test_tokens = [], [], []
    print(f"\n{'step':>4}  {'llvm token':<22}  {args.target + ' token':<22}  {'rel. error':>10}")
    for step in range(args.tokens):
        error = float(np.abs(t - r).max() / np.abs(r).max())
        want, got = int(np.argmax(r)), int(np.argmax(t))
        ref_tokens.append(want)
        test_tokens.append(got)
        problems = []
        if not np.isfinite(t).all():
            problems.append("non-finite logits")
        if got != want:
            problems.append(f"token differs (llvm's logit margin {float(r[want] - r[got]):.3g})")
        if not error <= tolerance:
            problems.append(f"error over {tolerance:g}")
        failures += [f"step {step}: {p}" for p in problems]
        print(f"{step:>4}  {_token(ref, want):<22}  {_token(ref, got):<22}  {error:>10.2e}"
              f"  {'; '.join(problems) or 'ok'}", flush=True)  # fmt: skip
        if step + 1 < args.tokens:
            r, t = step_all(want)  # both read llvm's token

    print(f"\nllvm:  {ref.tokenizer.decode(ref_tokens)!r}")
    print(f"{args.target}: {ref.tokenizer.decode(test_tokens)!r}")
    steps = max(args.tokens - 1, 1)
    times = [f"{n} {1000 * s / steps:.2f} ms" for (n, _), s in zip(engines, seconds, strict=True)]
    print(f"decode per token (logits copied back each step): {', '.join(times)}")
    if failures:
        print(f"\nFAIL: {args.target} differs from llvm ({quant.name}):", *failures, sep="\n  ")
        return 1
    print(f"\nPASS: {args.target} matches llvm ({quant.name}): {args.tokens} greedy tokens "
          f"identical, every step's relative logit error <= {tolerance:g}")  # fmt: skip
    return 0


def _token(engine, token: int) -> str:
    return f"{token:>6} {engine.tokenizer.decode([token])[:12]!r}"


if __name__ == "__main__":
    sys.exit(main())
