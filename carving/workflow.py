"""The TapML method end to end: compile, carve, test on the target, offload, run on the target
alone (a causal LM generates, an embedding model embeds: whatever the plan's task is).

`offload_model` and `migrate_model` are what `tapml offload` and `tapml migrate` call; each
returns a report (a JSON-able dict) and writes it, with an HTML page, into its directory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tapml.artifact import Artifact
from tapml.errors import TapmlError

from .carve import carve
from .offload import (
    TOLERANCES,
    Offloader,
    SplitRun,
    file_digest,
    kernel_order,
    state_key,
)
from .scenarios import AnyScenario, check

log = logging.getLogger("tapml")
FORMAT, VERSION = "tapml-migration-report", 1
ALONE = ("completion", "embeddings")  # what a scenario's `alone` reports, by task kind


@contextlib.contextmanager
def device_for(target: str, url: str | None) -> Iterator[str]:
    """`url`, or the URL of a device agent started on this machine for `target`."""
    if url is not None:
        yield url
        return
    from tapml.targets import backend_for
    from tapml.targets.remote import start_local_agent

    backend = backend_for(target).name
    log.info("starting a local device agent (%s backend)", backend)
    with start_local_agent(backend, trust_native_code=backend == "llvm") as local:
        yield local


def reference_source(model: str, source: str, quantization: str | None, progress: bool = True,
                     kv_cache: str | None = None,
                     buckets: tuple[tuple[int, int], ...] | None = None) -> Path:  # fmt: skip
    """`model` (or an artifact directory, as it is) compiled for `source` as other targets are
    compared with it: float32 arithmetic (`TargetSpec.reference_options`), and the KV cache
    `kv_cache`, by default the one every target holds (the activations' dtype)."""
    from tapml.api import artifact_for
    from tapml.quantization import DEFAULT, get_quantization
    from tapml.targets import get_target

    kv_cache = kv_cache or get_quantization(quantization or DEFAULT).dtype
    return artifact_for(model, source, quantization, progress=progress, kv_cache=kv_cache,
                        buckets=buckets, target_options=get_target(source).reference_options())


def artifacts(model: str, target: str, quantization: str | None, source: str = "llvm",
              bundle: Path | None = None, progress: bool = True,
              buckets: tuple[tuple[int, int], ...] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """The source's and the target's compiled artifacts of `model` (the same quantization, and
    an embedding model's `buckets`: the bundle's, if one is given)."""
    from tapml.api import ensure_compiled
    from tapml.compiler import CompileOptions

    kv_cache = None
    if bundle is not None:
        options = Artifact(bundle).options
        if options["target"] != target:
            raise TapmlError(f"{bundle} holds {options['target']} kernels, not {target}")
        quantization = quantization or options["quantization"]
        kv_cache, buckets = options["kv_cache"], options.get("buckets")
    # the source runs the target's plan: KV cache dtype and an encoder's buckets included
    kv_cache = kv_cache or CompileOptions.resolve(target, quantization).kv_cache
    source_dir = reference_source(model, source, quantization, progress, kv_cache, buckets)
    options = Artifact(source_dir).options
    target_dir = bundle or ensure_compiled(model, target, quantization, options["max_context"],
                                           options["chunk"], progress=progress,
                                           kv_cache=kv_cache,
                                           buckets=options.get("buckets"))  # fmt: skip
    source_plan = Artifact(source_dir).plan()
    target_plan = Artifact(target_dir).plan()
    if source_plan.functions != target_plan.functions:
        raise TapmlError(f"{target_dir} was compiled from another plan than {source_dir}; "
                         "compile both from the same model, quantization and options")
    return source_dir, Path(target_dir)


def offload_model(
    model: str,
    target: str,
    device_url: str,
    scenario: AnyScenario,
    out: Path,
    quantization: str | None = None,
    order: str = "plan",
    bundle: Path | None = None,
    suite_dir: Path | None = None,
    progress: bool = True,
    target_executor: Any = None,
    artifact_dirs: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """Offload `model`'s kernels to `target` on the device at `device_url`, step by step.

    Writes `out/state.json` (the finished evaluations; a rerun resumes from them) and
    `out/report.json` / `report.html`. If a kernel diverges, its carved calls (from
    `suite_dir`, else a suite carved from `scenario` into `out/suite`) are replayed on the
    target as a cross-check. When every kernel matches, the scenario runs on the target alone
    (`Scenario.alone`: a completion, or embeddings compared with the source's). `target_executor`
    reuses one already open on the device.
    """
    from tapml.runtime.engine import load_runtime
    from tapml.targets.remote import open_executor

    from . import report as reports

    source_dir, target_dir = artifact_dirs or artifacts(model, target, quantization,
                                                        bundle=bundle, progress=progress)
    source = load_runtime(source_dir)
    plan = source.plan
    check([scenario], plan.task["kind"])
    with contextlib.ExitStack() as stack:
        if target_executor is None:
            target_executor = stack.enter_context(
                open_executor(device_url, target, plan, target_dir))
            target_executor.load_params(Artifact(target_dir).weights())
        runs = scenario.runs(source)
        # an entry point the scenario never runs (a bucket its texts do not fill) has kernels
        # that are offloaded untested: no evidence that the model migrated
        not_run = [f for f in plan.functions if f not in {r.function for r in runs}]
        if not_run:
            log.warning("the %s scenario never runs %s: their kernels go untested",
                        scenario.name, ", ".join(not_run))  # fmt: skip
        order_list = kernel_order(plan, order)
        tolerance = TOLERANCES[plan.model.get("dtype", "float32")]
        spec_kernels = Artifact(target_dir).kernels_file(target)
        key = state_key(str(source_dir), file_digest(spec_kernels), target, order_list,
                        scenario.to_dict(), tolerance)  # fmt: skip
        offloader = Offloader(SplitRun(plan, source.executor, target_executor), runs,
                              order_list, tolerance, Path(out) / "state.json", key,
                              progress=lambda m: log.info("offload: %s", m))  # fmt: skip
        start = time.perf_counter()
        result = offloader.offload()
        n = len(order_list)
        report: dict[str, Any] = {
            "format": "tapml-offload-report", "version": 1, "model": model,
            "quantization": plan.model.get("quantization"), "source": "llvm", "target": target,
            "device": device_url, "scenario": scenario.name, "order": order,
            "kernels": order_list, "tolerance": tolerance, "runs": result.runs,
            "run_bound": math.ceil(math.log2(max(n, 1))) + 2, "resumed": result.resumed,
            "seconds": time.perf_counter() - start,
            "steps": [{**e.__dict__, "added": order_list[:e.offloaded]}
                      for e in result.evaluations],
            "migrated": result.migrated and not not_run, "culprit": result.culprit,
            "not_run": not_run,
        }  # fmt: skip
        if result.culprit is not None:
            report["cross_check"] = _cross_check(result.culprit, model, source_dir, target,
                                                 target_dir, device_url, scenario, out,
                                                 suite_dir, progress)  # fmt: skip
        else:
            report.update(scenario.alone(load_runtime(target_dir, executor=target_executor),
                                         source))  # fmt: skip
    reports.write_offload(report, Path(out))
    return report


def _cross_check(kernel: str, model: str, source_dir: Path, target: str, target_dir: Path,
                 device_url: str, scenario: AnyScenario, out: Path, suite_dir: Path | None,
                 progress: bool) -> dict[str, Any]:  # fmt: skip
    """Replay the culprit's carved calls on the target: do its unit tests fail too?"""
    from tapml.targets.remote import open_executor

    from .replay import replay
    from .suite import Suite

    if suite_dir is None:
        suite_dir = Path(out) / "suite"
        log.info("carving the %s scenario for the cross-check into %s", scenario.name, suite_dir)
        suite = carve(source_dir, suite_dir, [scenario], model, progress=progress)
    else:
        suite = Suite.load(suite_dir)
    if not any(c["kernel"] == kernel for c in suite.calls):
        return {"kernel": kernel, "calls": 0, "failed": 0,
                "verdict": f"{suite_dir} has no carved call of {kernel}"}  # fmt: skip
    result = replay(suite, target, lambda plan: open_executor(device_url, target, plan,
                                                              target_dir),
                    device_url, lambda k: k == kernel, progress=False)  # fmt: skip
    calls = [c for c in result.calls if c.kernel == kernel]
    failed = [c for c in calls if c.status != "pass"]
    verdict = (f"{len(failed)} of {len(calls)} carved calls of {kernel} fail on {target}: "
               "the kernel itself is wrong" if failed else
               f"all {len(calls)} carved calls of {kernel} pass on {target}: the divergence "
               "comes from how it meets its neighbours (layout, aliasing, state)")  # fmt: skip
    return {"kernel": kernel, "calls": len(calls), "failed": len(failed), "verdict": verdict,
            "messages": sorted({c.message for c in failed if c.message})}  # fmt: skip


def migrate_model(
    model: str,
    target: str,
    device_url: str | None,
    out: Path,
    scenarios: list[AnyScenario],
    quantization: str | None = None,
    order: str = "plan",
    progress: bool = True,
    artifact_dirs: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """The whole method: compile, carve `scenarios` on llvm, test the suite on the target,
    offload the first scenario kernel by kernel, and run it on the target alone (generate, or
    embed). `artifact_dirs`: the source's and target's artifacts, compiled already.

    Without `device_url` a device agent is started on this machine. Writes `out/suite`,
    `out/offload` and the combined `out/report.json` / `report.html`.
    """
    from tapml.targets.remote import open_executor

    from . import report as reports
    from .replay import replay

    out = Path(out)
    start = time.perf_counter()
    log.info("step 1/4: compiling %s for llvm and %s", model, target)
    source_dir, target_dir = artifact_dirs or artifacts(model, target, quantization,
                                                        progress=progress)  # fmt: skip
    with device_for(target, device_url) as url:
        log.info("step 2/4: carving %d scenarios on llvm", len(scenarios))
        suite = carve(source_dir, out / "suite", scenarios, model, progress=progress)
        log.info("step 3/4: testing %d carved calls on %s", len(suite.calls), target)
        tested = replay(suite, target, lambda plan: open_executor(url, target, plan, target_dir),
                        str(url), progress=progress)  # fmt: skip
        reports.write(tested, out / "suite" / "reports" / target)
        log.info("step 4/4: offloading kernel by kernel, then running on %s alone", target)
        plan = Artifact(target_dir).plan()
        with open_executor(url, target, plan, target_dir) as executor:
            executor.load_params(Artifact(target_dir).weights())
            offload = offload_model(model, target, str(url), scenarios[0], out / "offload",
                                    order=order, suite_dir=out / "suite", progress=progress,
                                    target_executor=executor,
                                    artifact_dirs=(source_dir, target_dir))  # fmt: skip
    kernels = tested.kernels()
    report = {
        "format": FORMAT, "version": VERSION, "model": model, "target": target,
        "device": device_url or "a local device agent", "quantization": offload["quantization"],
        "seconds": time.perf_counter() - start,
        "test": {"calls": len(tested.calls), "failed_calls": len(tested.failed),
                 "kernels": len(kernels),
                 "failed_kernels": [k["kernel"] for k in kernels if k["status"] != "pass"],
                 "report": str(out / "suite" / "reports" / target / "report.html")},
        "offload": offload,
        "migrated": offload["migrated"] and not tested.failed,
        **{key: offload[key] for key in ALONE if key in offload},
    }  # fmt: skip
    reports.write_migration(report, out)
    return report
