"""`tapml matrix`: every stage of the method for every model of the zoo on every target.

Stages, in order (a stage that does not apply to a target is left out of its row):

    compile  the model for the target (cached, as `tapml run` does)
    run      a causal LM: greedy tokens of a short prompt on the target here; an embedding
             model: the default scenario's texts embedded there, against the numpy reference;
             an image graph: the default scenario's rendered pages, against onnxruntime
    carve    unit tests carved on llvm from the task's default scenario (once per model,
             shared by its rows)
    test     the carved suite replayed on the target
    offload  the kernels moved to the target step by step through a local device agent
    package  a bundle: webgpu for the browser, android for opencl; checked by `verify`
    bench    a causal LM: prefill and decode tokens/s of short runs; an embedding model: texts
             and tokens/s of a full batch of its largest bucket; a graph: ms per run

What a stage runs is the compiled plan's task kind ("causal_lm", "embedding", "graph").

A target this machine cannot execute gets "compiled, not executed" once it compiles. Each
stage's result is written to DIR/matrix.json as soon as it is known, so an interrupted
matrix resumes where it stopped; results of another tapml source are not reused.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TapmlError
from .fileio import write_atomic
from .models import model_task

log = logging.getLogger("tapml")

STAGES = ("compile", "run", "carve", "test", "offload", "package", "bench")
FORMAT, VERSION = "tapml-matrix", 1
PROMPT = "The capital of France is"
RUN_TOKENS = 8
BENCH = {"prompt_tokens": 32, "decode_tokens": 8}  # short: lavapipe takes a second a token
# |embedding element - numpy reference| allowed: float32 kernels in any summation order against
# float64, on unit vectors
EMBED_ATOL = 1e-3
GRAPH_RTOL = 1e-3  # a graph's outputs against onnxruntime's, relative to the largest
BUNDLES = {"webgpu": "webgpu", "opencl": "android"}  # target -> the bundle it packages as
NOT_EXECUTED = "compiled, not executed"


@dataclass
class Cell:
    """One model and target: what each stage gave."""

    model: str
    target: str
    stages: dict[str, dict[str, Any]]

    @property
    def summary(self) -> str:
        """"pass", "compiled, not executed", or the first failing stage and its message."""
        for stage in STAGES:
            result = self.stages.get(stage)
            if result and result["status"] == "fail":
                return f"{stage}: {result['message']}"
        if any(r["status"] == "not executed" for r in self.stages.values()):
            return NOT_EXECUTED
        return "pass" if self.stages else "-"


class Matrix:
    """A matrix being run into a directory (see the module docstring)."""

    def __init__(self, directory: Path, fresh: bool = False, progress: bool = True):
        from .cache import _source_digest

        self.directory, self.progress = Path(directory), progress
        self.state_file = self.directory / "matrix.json"
        self.key = _source_digest()
        self.results: dict[str, dict[str, dict[str, dict]]] = {}
        if not fresh and self.state_file.is_file():
            state = json.loads(self.state_file.read_text())
            if state.get("format") == FORMAT and state.get("key") == self.key:
                self.results = state["results"]
            else:
                log.info("%s is of another tapml source: running the matrix anew",
                         self.state_file)  # fmt: skip

    def run(self, models: Iterable[str], targets: Iterable[str], stages: Iterable[str]
            ) -> list[Cell]:  # fmt: skip
        cells = []
        for model in models:
            for target in targets:
                for stage in [s for s in STAGES if s in set(stages)]:
                    self._stage(model, target, stage)
                cells.append(Cell(model, target, self.results.get(model, {}).get(target, {})))
        return cells

    def _stage(self, model: str, target: str, stage: str) -> None:
        done = self.results.setdefault(model, {}).setdefault(target, {})
        if stage in done:
            return
        if any(r["status"] in ("fail", "not executed") for r in done.values()):
            return  # the row already stopped
        work = _STAGES[stage]
        start = time.perf_counter()
        log.info("matrix: %s on %s: %s", model, target, stage)
        try:
            outcome = work(self, model, target)
        except Exception as e:  # noqa: BLE001 - a failure is a result: record it, go on
            if not isinstance(e, TapmlError):
                log.debug("%s", traceback.format_exc())
            outcome = {"status": "fail", "message": _one_line(e)}
        if outcome is None:  # the stage does not apply to this target
            return
        done[stage] = {**outcome, "seconds": round(time.perf_counter() - start, 1)}
        self._save()

    def _save(self) -> None:
        state = {"format": FORMAT, "version": VERSION, "key": self.key, "results": self.results}
        write_atomic(self.state_file, json.dumps(state, indent=1).encode())

    # -- what the stages share ------------------------------------------------------------
    def artifact(self, model: str, target: str) -> Path:
        from .api import ensure_compiled

        return ensure_compiled(model, target, progress=self.progress)

    def suite_dir(self, model: str) -> Path:
        return self.directory / "carved" / Path(model).name.removesuffix(".gguf")


def _executes(target: str) -> tuple[bool, str]:
    from .targets import executes_here, get_target

    return executes_here(get_target(target))


def _compile(m: Matrix, model: str, target: str) -> dict[str, Any]:
    m.artifact(model, target)
    return {"status": "pass"}


def _run(m: Matrix, model: str, target: str) -> dict[str, Any]:
    executes, why = _executes(target)
    if not executes:
        return {"status": "not executed", "message": why}
    artifact = m.artifact(model, target)
    return {"status": "pass", **_RUNS[model_task(artifact)](model, artifact)}


def _generate(model: str, artifact: Path) -> dict[str, Any]:
    from .runtime.engine import Engine

    text = "".join(Engine(artifact).generate(PROMPT, max_tokens=RUN_TOKENS))
    if not text.strip():
        raise TapmlError(f"generated nothing after {PROMPT!r}")
    return {"text": text}


def _embed(model: str, artifact: Path) -> dict[str, Any]:
    """The default scenario's texts embedded on the target, against the numpy forward pass
    over the model file's own weights."""
    from .carving.scenarios import default
    from .compiler import load_model_file
    from .models import resolve_gguf
    from .runtime.embedder import Embedder

    embedder, scenario = Embedder(artifact), default("embedding")
    got = scenario.embed(embedder)
    rows = [row for request in scenario.ids(embedder) for row in request]
    source = load_model_file(resolve_gguf(model)[1])
    want = source.architecture.reference(source.float_weights(), source.config, rows)
    worst = float(np.abs(got - want).max())
    if worst > EMBED_ATOL:
        raise TapmlError(f"the embeddings of {len(rows)} texts differ from the numpy reference "
                         f"by up to {worst:.2e} (more than {EMBED_ATOL:g})")  # fmt: skip
    return {"texts": len(rows), "max_abs": worst}


def _run_graph(model: str, artifact: Path) -> dict[str, Any]:
    """The default scenario's rendered pages through the graph on the target, against
    onnxruntime on the model's own ONNX file."""
    import onnxruntime as ort

    from .carving.scenarios import default
    from .models import resolve_gguf
    from .runtime.graph import GraphRunner

    runner = GraphRunner(artifact)
    session = ort.InferenceSession(str(resolve_gguf(model)[1]), providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs in default("graph").ids(runner):
        got, want = runner.run(inputs), session.run(runner.outputs, inputs)
        for name, expected in zip(runner.outputs, want, strict=True):
            scale = max(float(np.abs(expected).max()), 1e-30)
            worst = max(worst, float(np.abs(got[name] - expected).max()) / scale)
    if worst > GRAPH_RTOL:
        raise TapmlError(f"the outputs differ from onnxruntime's by up to {worst:.2e} of the "
                         f"largest (more than {GRAPH_RTOL:g})")  # fmt: skip
    return {"runs": len(runner.shapes), "max_rel": worst}


def _carve(m: Matrix, model: str, target: str) -> dict[str, Any]:
    """Once per model: the task's default scenario (a causal LM's chat, an embedding model's
    search) carved on llvm with the KV cache every target holds."""
    from .carving.carve import carve
    from .carving.scenarios import default
    from .carving.workflow import reference_source

    for other in m.results.get(model, {}).values():
        if other.get("carve", {}).get("status") == "pass":
            return other["carve"]
    source = reference_source(model, "llvm", None, m.progress)
    suite = carve(source, m.suite_dir(model), [default(model_task(source))], model,
                  progress=m.progress)  # fmt: skip
    return {"status": "pass", "calls": len(suite.calls)}


def _test(m: Matrix, model: str, target: str) -> dict[str, Any]:
    from .carving.replay import compiled_for, replay
    from .carving.suite import Suite
    from .targets import load_executor

    executes, why = _executes(target)
    if not executes:
        return {"status": "not executed", "message": why}
    suite = Suite.load(m.suite_dir(model))
    artifact = compiled_for(suite, target, m.progress)
    result = replay(suite, target, lambda plan: load_executor(target, plan, artifact), why,
                    progress=m.progress)  # fmt: skip
    if result.failed:
        failed = result.failed
        raise TapmlError(f"{len(failed)} of {len(result.calls)} carved calls fail on {target}, "
                         f"first {failed[0].kernel}")  # fmt: skip
    return {"status": "pass", "calls": len(result.calls)}


def _offload(m: Matrix, model: str, target: str) -> dict[str, Any] | None:
    from .carving.scenarios import default
    from .carving.workflow import device_for, offload_model

    if target == "llvm":
        return None  # the source itself
    executes, why = _executes(target)
    if not executes:
        return {"status": "not executed", "message": why}
    out = m.directory / "offload" / f"{Path(model).name.removesuffix('.gguf')}-{target}"
    scenario = default(model_task(m.artifact(model, target)))
    with device_for(target, None) as url:
        report = offload_model(model, target, url, scenario, out, progress=m.progress)
    if report["culprit"] is not None:
        raise TapmlError(f"kernel {report['culprit']} breaks the results on {target}")
    if not report["migrated"]:
        raise TapmlError(f"the {scenario.name} scenario never runs {', '.join(report['not_run'])}")
    return {"status": "pass", "runs": report["runs"]}


def _package(m: Matrix, model: str, target: str) -> dict[str, Any] | None:
    from .package import package, verify

    platform = BUNDLES.get(target)
    if platform is None:
        return None
    out = m.directory / "bundles" / f"{Path(model).name.removesuffix('.gguf')}-{platform}"
    done = package(model, platform, out, progress=m.progress)
    problems = verify(done.path, progress=False)
    if problems:
        raise TapmlError(f"the {platform} bundle fails verify: {problems[0]}")
    return {"status": "pass", "bundle": str(done.path)}


def _bench(m: Matrix, model: str, target: str) -> dict[str, Any]:
    executes, why = _executes(target)
    if not executes:
        return {"status": "not executed", "message": why}
    artifact = m.artifact(model, target)
    return {"status": "pass", **_BENCHES[model_task(artifact)](artifact)}


def _bench_generation(artifact: Path) -> dict[str, Any]:
    """Prefill and decode speed in this process (`tapml bench` adds a start-up probe in a
    fresh process and a bandwidth test, which a row of the matrix does not report)."""
    from .bench import run
    from .runtime.engine import Engine

    result = run(Engine(artifact), **BENCH)
    return {"decode_tok_s": round(result["decode_tok_s"], 1),
            "prefill_tok_s": round(result["prefill_tok_s"], 1)}  # fmt: skip


def _bench_embedding(artifact: Path) -> dict[str, Any]:
    """Texts and tokens per second of one full batch of the largest bucket, after a warm-up
    run (which builds pipelines and touches memory)."""
    from .bench import prompt_ids
    from .runtime.embedder import Embedder

    embedder = Embedder(artifact)
    bucket = max(embedder.task.buckets, key=lambda b: b["batch"] * b["length"])
    rows = [prompt_ids(embedder.tokenizer, bucket["length"])] * bucket["batch"]
    call = embedder.task.call(bucket, rows)
    embedder.executor.run(*call)
    start = time.perf_counter()
    embedder.executor.run(*call)
    seconds = time.perf_counter() - start
    return {"bucket": f"{bucket['batch']}x{bucket['length']}",
            "texts_per_s": round(bucket["batch"] / seconds, 1),
            "tokens_per_s": round(bucket["batch"] * bucket["length"] / seconds, 1)}  # fmt: skip


def _bench_graph(artifact: Path) -> dict[str, Any]:
    """Milliseconds per run of each entry point, after a warm-up run."""
    from .runtime.graph import GraphRunner

    runner = GraphRunner(artifact)
    timings = {}
    for shapes in runner.task.shapes:
        inputs = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        runner.run(inputs)
        start = time.perf_counter()
        runner.run(inputs)
        label = ",".join("x".join(map(str, s)) for s in shapes.values())
        timings[label] = round((time.perf_counter() - start) * 1e3, 1)
    return {"ms_per_run": timings}


# what the run and bench stages do, by the plan's task kind
_RUNS = {"causal_lm": _generate, "embedding": _embed, "graph": _run_graph}
_BENCHES = {"causal_lm": _bench_generation, "embedding": _bench_embedding, "graph": _bench_graph}


_STAGES: dict[str, Callable[[Matrix, str, str], dict[str, Any] | None]] = {
    "compile": _compile, "run": _run, "carve": _carve, "test": _test, "offload": _offload,
    "package": _package, "bench": _bench,
}  # fmt: skip


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def table(cells: list[Cell], targets: list[str]) -> str:
    """The models x targets table, as Markdown."""
    models = list(dict.fromkeys(c.model for c in cells))
    by = {(c.model, c.target): c for c in cells}
    lines = ["| model | " + " | ".join(targets) + " |",
             "|---|" + "---|" * len(targets)]  # fmt: skip
    for model in models:
        row = [by[model, t].summary.replace("|", "\\|") for t in targets]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines)
