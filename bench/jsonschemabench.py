"""Structured output on real-world JSON schemas (JSONSchemaBench's MaskBench files).

    .venv/bin/python bench/jsonschemabench.py DIR [--limit N] [--json OUT]
    .venv/bin/python bench/jsonschemabench.py DIR --generate 200 --seed 0

Acceptance (the default): the grammar layer true to the spec. Each file's schema is compiled by
three engines in one run: tapml (its schema handling, default backend and fallback, with the
generation defaults off and any JSON whitespace accepted), raw llguidance and raw xgrammar
(the schema as given, any whitespace, through tapml's adapters: spec semantics, so XGrammar's
strict_mode is off, and llguidance reads an overlapping oneOf as anyOf instead of refusing
it). Each test instance is serialized
(json.dumps), tokenized with SmolLM2's tokenizer and fed through the engine's token mask one
token at a time: a valid instance must get through and may end there, an invalid one must be
stopped. A file passes when its grammar compiles and every instance is judged right. tapml's
check after generation is reported in its own column (invalid instances it catches that the
mask let through) and never counts as a rejection. Mask times per token (p50, p99) are over
the files every engine compiles.

--generate N: N files drawn at random (seeded), SmolLM2 on llvm answering "Answer in JSON."
under each schema with tapml's defaults and --max-tokens 256 (greedy); counts complete and
valid, refused before generation, truncated, and invalid after the check.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tapml.errors import TapmlError
from tapml.runtime import grammar, schema
from tapml.runtime.grammar import make_constraint

ENGINES = ("tapml", "llguidance", "xgrammar")


def load_files(directory: Path, limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(name, document) of each MaskBench file in `directory`, sorted by name."""
    paths = sorted(Path(directory).glob("*.json"))[:limit]
    if not paths:
        raise SystemExit(f"{directory}: no .json files")
    return [(p.stem, json.loads(p.read_text())) for p in paths]


def source(name: str) -> str:
    """The set a file comes from: Github, Kubernetes, Glaiveai2K, BFCL..."""
    return re.match(r"[A-Za-z0-9]+", name).group(0)


def compile_engine(engine: str, document: Any, tokenizer) -> grammar.GrammarConstraint:
    """The engine's constraint for `document`, true to the spec: any whitespace, no defaults."""
    text = json.dumps(document)
    if engine == "tapml":
        return make_constraint("json_schema", text, tokenizer, defaults=schema.SPEC,
                               whitespace="any")  # fmt: skip
    return grammar.compile_grammar(engine, "json_schema", text, tokenizer, "any")  # as given


def judge(constraint: grammar.GrammarConstraint, ids: list[int], times: list[float]) -> bool:
    """Feed `ids` through the mask (each mask's time appended to `times`); whether all were
    allowed and the grammar may end after them."""
    constraint.reset()
    for token in ids:
        start = time.perf_counter()
        bitmask = constraint.bitmask()
        times.append(time.perf_counter() - start)
        if not bitmask[0, token // 32] >> (token % 32) & 1:
            return False
        constraint.accept(token)
    bitmask = constraint.bitmask()
    return any(bitmask[0, s // 32] >> (s % 32) & 1 for s in constraint.vocab.stop_ids)


def run_file(document: dict[str, Any], tokenizer, engines=ENGINES) -> dict[str, Any]:
    """One file through every engine: compiled?, compile seconds, tests judged right, mask
    times; and for tapml, the invalid instances its post-check catches."""
    result: dict[str, Any] = {}
    tests = [(t["valid"], tokenizer.encode(json.dumps(t["data"]))) for t in document["tests"]]
    for engine in engines:
        start = time.perf_counter()
        try:
            constraint = compile_engine(engine, document["schema"], tokenizer)
        except (TapmlError, RecursionError) as e:
            result[engine] = {"compiled": False, "error": str(e)[:200],
                              "compile_s": time.perf_counter() - start}  # fmt: skip
            continue
        compile_s, times, right, caught = time.perf_counter() - start, [], 0, 0
        for (valid, ids), test in zip(tests, document["tests"], strict=True):
            accepted = judge(constraint, ids, times)
            right += accepted == valid
            if engine == "tapml" and accepted and not valid:
                caught += bool(constraint.violations(json.dumps(test["data"])))
        result[engine] = {"compiled": True, "compile_s": compile_s, "right": right,
                          "passed": right == len(tests), "mask_s": times}  # fmt: skip
        if engine == "tapml":
            result[engine]["post_check_caught"] = caught
    return result


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summarize(results: dict[str, dict[str, Any]], engines=ENGINES) -> dict[str, Any]:
    """Pass rates by engine and by source set; mask p50/p99 over files every engine compiles."""
    everywhere = [n for n, r in results.items() if all(r[e]["compiled"] for e in engines)]
    summary: dict[str, Any] = {"files": len(results), "compiled_by_all": len(everywhere)}
    for engine in engines:
        runs = [r[engine] for r in results.values()]
        masks = [t for n in everywhere for t in results[n][engine]["mask_s"]]
        summary[engine] = {
            "compiled": sum(r["compiled"] for r in runs),
            "passed": sum(r.get("passed", False) for r in runs),
            "compile_s_p50": statistics.median(r["compile_s"] for r in runs),
            "mask_us_p50": 1e6 * percentile(masks, 0.5),
            "mask_us_p99": 1e6 * percentile(masks, 0.99),
        }
    summary["tapml"]["post_check_caught"] = sum(
        r["tapml"].get("post_check_caught", 0) for r in results.values())  # fmt: skip
    by_source: dict[str, Counter] = defaultdict(Counter)
    for name, r in results.items():
        by_source[source(name)]["files"] += 1
        for engine in engines:
            by_source[source(name)][engine] += r[engine].get("passed", False)
    summary["by_source"] = {s: dict(c) for s, c in sorted(by_source.items())}
    return summary


def print_acceptance(summary: dict[str, Any], engines=ENGINES) -> None:
    files = summary["files"]
    print(f"{files} files; {summary['compiled_by_all']} compiled by every engine\n")
    print("| engine | compiled | passed | pass rate | compile p50 | mask p50 | mask p99 |")
    print("|---|---|---|---|---|---|---|")
    for e in engines:
        s = summary[e]
        print(f"| {e} | {s['compiled']} | {s['passed']} | {100 * s['passed'] / files:.1f}% | "
              f"{1e3 * s['compile_s_p50']:.1f} ms | {s['mask_us_p50']:.0f} us | "
              f"{s['mask_us_p99']:.0f} us |")  # fmt: skip
    print(f"\ntapml's check after generation caught {summary['tapml']['post_check_caught']} "
          "invalid instances the mask let through (not counted above)\n")  # fmt: skip
    print("| source | files | " + " | ".join(engines) + " |")
    print("|---|---|" + "---|" * len(engines))
    for name, c in summary["by_source"].items():
        print(f"| {name} | {c['files']} | " + " | ".join(str(c.get(e, 0)) for e in engines) + " |")


def generate(files: list[tuple[str, dict[str, Any]]], n: int, seed: int,
             max_tokens: int = 256) -> dict[str, Any]:  # fmt: skip
    """SmolLM2 under N random files' schemas with tapml's defaults: the outcome of each."""
    from tapml.api import artifact_for
    from tapml.runtime.engine import Engine
    from tapml.runtime.sampling import SamplingParams

    engine = Engine(artifact_for("smollm2-135m", "llvm", progress=False))
    outcomes, rows = Counter(), []
    for name, document in random.Random(seed).sample(files, min(n, len(files))):
        start = time.perf_counter()
        try:
            constraint = make_constraint("json_schema", json.dumps(document["schema"]),
                                         engine.tokenizer)  # fmt: skip
        except (TapmlError, RecursionError) as e:
            outcomes["refused"] += 1
            rows.append({"file": name, "outcome": "refused", "why": str(e)[:200]})
            continue
        text = "".join(engine.generate("Answer in JSON.", SamplingParams(max_tokens=max_tokens),
                                       constraint=constraint))  # fmt: skip
        if engine.finish_reason in ("length", "context"):
            outcome, why = "truncated", engine.finish_reason
        else:
            problems = constraint.violations(text)
            outcome, why = ("invalid", problems[0]) if problems else ("valid", "")
        outcomes[outcome] += 1
        rows.append({"file": name, "outcome": outcome, "why": why, "tokens": len(
            engine.tokenizer.encode(text)), "seconds": time.perf_counter() - start,
            "backend": constraint.backend, "post_checked": constraint.post_checked,
            "text": text})  # fmt: skip
        print(f"{name}: {outcome} {why}", flush=True)
    return {"n": sum(outcomes.values()), "seed": seed, "outcomes": dict(outcomes), "files": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--limit", type=int, help="Only the first N files (by name).")
    parser.add_argument("--generate", type=int, metavar="N", help="Generate under N files.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args()
    files = load_files(args.directory, args.limit)
    if args.generate:
        report = generate(files, args.generate, args.seed)
        total = report["n"]
        for outcome in ("valid", "truncated", "refused", "invalid"):
            count = report["outcomes"].get(outcome, 0)
            print(f"{outcome}: {count} of {total} ({100 * count / total:.1f}%)")
    else:
        from tapml.api import artifact_for
        from tapml.artifact import Artifact

        tokenizer = Artifact(artifact_for("smollm2-135m", "llvm", progress=False)).tokenizer()
        results = {}
        for i, (name, document) in enumerate(files):
            results[name] = run_file(document, tokenizer)
            if (i + 1) % 100 == 0:
                print(f"{i + 1} files", flush=True)
        report = {"summary": summarize(results), "files": {
            n: {e: {k: v for k, v in r[e].items() if k != "mask_s"} for e in ENGINES}
            for n, r in results.items()}}  # fmt: skip
        print_acceptance(report["summary"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
