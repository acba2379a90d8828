"""OCR latency: `tapml ocr`'s pipeline on llvm against rapidocr on onnxruntime, on the same
rendered pages with the same thread counts, each configuration in a fresh process, side by
side in one run; then each graph alone at the same fixed shapes (tapml and onnxruntime), and
optionally each graph on WebGPU (a regression figure: lavapipe says nothing of GPU speed).

    .venv/bin/python bench/ocr.py [--threads 1 2] [--webgpu] [--json]

A page is two lines of text rendered black on white (the fonts and sizes the tests read).
rapidocr 1.4.4 runs its own pipeline (the detector at its own size: the shortest side scaled to
736), so the page figures compare whole pipelines as their users get them; the graph figures
compare the compiled graphs with onnxruntime at identical shapes. Each worker runs once to
warm up, then repeats for at least `--seconds` and reports the median. Both pipelines' texts
are checked against the rendered ones. Needs the bench extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

FONTS = "/usr/share/fonts/truetype"
PAGES = [
    (f"{FONTS}/dejavu/DejaVuSans.ttf", 48, ["Hello World 2026", "tapml reads text"]),
    (f"{FONTS}/liberation/LiberationSerif-Regular.ttf", 40, ["the quick brown fox",
                                                              "3.14 and 2026"]),
    (f"{FONTS}/dejavu/DejaVuSansMono.ttf", 32, ["tapml reads text", "0123456789"]),
]  # fmt: skip
GRAPHS = ("pp-ocrv4-det", "pp-ocr-cls", "pp-ocrv4-rec")


def pages() -> list:
    from tapml.runtime.text_image import render_text

    return [render_text(lines, font, size) for font, size, lines in PAGES]


def time_calls(call, seconds: float) -> float:
    call()  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- workers: one configuration each, in a process of its own ------------------------------
def tapml_pages(threads: int, seconds: float) -> dict:
    from tapml.targets.llvm import use_threads

    use_threads(threads)
    from tapml.api import load_ocr

    ocr, images = load_ocr("llvm", progress=False), pages()
    texts = [[line.text for line in ocr.read(image)] for image in images]
    return {"seconds": [time_calls(lambda i=i: ocr.read(i), seconds) for i in images],
            "texts": texts}  # fmt: skip


def rapidocr_pages(threads: int, seconds: float) -> dict:
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)
    images = [np.asarray(image) for image in pages()]
    texts = [[line[1] for line in (engine(image)[0] or [])] for image in images]
    return {"seconds": [time_calls(lambda i=i: engine(i), seconds) for i in images],
            "texts": texts}  # fmt: skip


def graph_worker(peer: str, target: str, threads: int, seconds: float) -> dict:
    """Seconds per run of each graph's entry point, zeros in (latency does not depend on
    the values)."""
    from tapml.targets.llvm import use_threads

    use_threads(threads)
    import onnxruntime as ort

    from tapml.api import ensure_compiled
    from tapml.models import MODELS
    from tapml.runtime.graph import GraphRunner

    out = {}
    for name in GRAPHS:
        runner = GraphRunner(ensure_compiled(name, target, progress=False))
        if peer == "onnxruntime":
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(str(MODELS[name].gguf_path()), options,
                                           providers=["CPUExecutionProvider"])  # fmt: skip
        for shape in runner.shapes:
            x = np.zeros(shape, np.float32)
            if peer == "onnxruntime":
                run = functools.partial(session.run, None, {runner.inputs[0]: x})
            else:
                run = functools.partial(runner, x)
            out[f"{name} {'x'.join(map(str, shape))}"] = time_calls(run, seconds)
    return out


def measure(worker: str, threads: int, seconds: float, target: str = "llvm") -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--threads", str(threads),
               "--seconds", str(seconds), "--target", target]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{worker} threads={threads} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--webgpu", action="store_true", help="also each graph on WebGPU")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="llvm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (threads,) = args.threads
        workers = {"tapml-pages": lambda: tapml_pages(threads, args.seconds),
                   "rapidocr-pages": lambda: rapidocr_pages(threads, args.seconds),
                   "tapml-graphs": lambda: graph_worker("tapml", args.target, threads,
                                                        args.seconds),
                   "onnxruntime-graphs": lambda: graph_worker("onnxruntime", "llvm", threads,
                                                              args.seconds)}  # fmt: skip
        print(json.dumps(workers[args.worker]()))
        return
    want = [lines for _, _, lines in PAGES]
    results = {"pages": [], "graphs": [], "webgpu": {}}
    for threads in args.threads:
        mine, peer = (measure(w, threads, args.seconds) for w in ("tapml-pages", "rapidocr-pages"))
        for i, lines in enumerate(want):
            row = {"threads": threads, "page": i, "tapml_ms": mine["seconds"][i] * 1e3,
                   "rapidocr_ms": peer["seconds"][i] * 1e3,
                   "tapml_vs_rapidocr": peer["seconds"][i] / mine["seconds"][i],
                   "tapml_exact": mine["texts"][i] == lines,
                   "rapidocr_exact": peer["texts"][i] == lines}  # fmt: skip
            results["pages"].append(row)
            if not args.json:
                print(f"page {i} threads={threads}: tapml {row['tapml_ms']:.0f} ms, rapidocr "
                      f"{row['rapidocr_ms']:.0f} ms: {row['tapml_vs_rapidocr']:.2f}x; exact "
                      f"text: tapml {row['tapml_exact']}, rapidocr {row['rapidocr_exact']}",
                      flush=True)  # fmt: skip
        ours, theirs = (measure(w, threads, args.seconds)
                        for w in ("tapml-graphs", "onnxruntime-graphs"))  # fmt: skip
        for graph, seconds in ours.items():
            row = {"threads": threads, "graph": graph, "tapml_ms": seconds * 1e3,
                   "onnxruntime_ms": theirs[graph] * 1e3,
                   "tapml_vs_onnxruntime": theirs[graph] / seconds}  # fmt: skip
            results["graphs"].append(row)
            if not args.json:
                print(f"{graph} threads={threads}: tapml {row['tapml_ms']:.1f} ms, onnxruntime "
                      f"{row['onnxruntime_ms']:.1f} ms: {row['tapml_vs_onnxruntime']:.2f}x",
                      flush=True)  # fmt: skip
    if args.webgpu:
        results["webgpu"] = {g: s * 1e3 for g, s in
                             measure("tapml-graphs", 1, 0.0, "webgpu").items()}  # fmt: skip
        if not args.json:
            for graph, ms in results["webgpu"].items():
                print(f"{graph} on webgpu: {ms:.0f} ms")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
