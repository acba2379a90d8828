"""`tapml offload`: move a model's kernels to a target device step by step."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tapml.carving.scenarios import BY_TASK, NAMES, TASKS
from tapml.targets import TARGETS

from .options import buckets_option, quantization_option


def migration_options(f):
    """--target, --device, --quantization, --buckets, --order, --scenario and --prompt."""
    for decorator in reversed(
        [
            click.option("--target", type=click.Choice([t for t in TARGETS if t != "llvm"]),
                         required=True, help="Where the kernels move to."),
            click.option(
                "--device", "device_url", metavar="URL", default=None,
                help="The target device: tapml://HOST:PORT (a `tapml device serve` agent) "
                "[default: start an agent on this machine].",
            ),
            quantization_option,
            buckets_option,
            click.option(
                "--order", type=click.Choice(["plan", "kind"]), default="plan",
                show_default=True,
                help="Offload order: the plan's first-use order, or grouped by kernel kind "
                "(embedding, norms, rope, KV writes, attention, matmuls).",
            ),
            click.option("--scenario", type=click.Choice(NAMES), default=None,
                         help="The built-in scenario the evaluation runs use [default: "
                         + ", ".join(f"{next(iter(s))} for {TASKS[kind]}"
                                     for kind, s in BY_TASK.items()) + "]."),
            click.option("--prompt", default=None, metavar="TEXT",
                         help="Evaluate on this prompt (a text to embed) instead."),
        ]
    ):  # fmt: skip
        f = decorator(f)
    return f


def chosen_scenarios(source_dir: Path, scenario: str | None, prompt: str | None,
                     every: bool = False) -> list:  # fmt: skip
    """The evaluation scenario of the compiled model's task kind (`prompt`'s, else
    `scenario`, else the kind's first built-in one), then with `every` the kind's other
    built-in ones."""
    from tapml.artifact import Artifact
    from tapml.carving.scenarios import builtin, default, select

    kind = Artifact(source_dir).plan().task["kind"]
    if prompt:
        first = select((), (prompt,), kind)[0]
    else:
        first = select((scenario,), (), kind)[0] if scenario else default(kind)
    return [first] + [s for s in builtin(kind).values() if s.name != first.name] * every


@click.command("offload")
@click.argument("model")
@migration_options
@click.option("--bundle", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="Offload this artifact's or bundle's kernels instead of "
              "compiling MODEL for --target.")
@click.option("--suite", "suite_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Carved suite for the cross-check of a diverging kernel "
              "[default: carve the scenario].")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where state and reports go [default: offload/MODEL-TARGET].")
@click.pass_obj
def command(obj, model, target, device_url, quantization, buckets, order, scenario, prompt,
            bundle, suite_dir, output) -> None:  # fmt: skip
    """Run MODEL with more and more of its kernels on the target device.

    An evaluation run is the scenario's runs: a causal LM's prefill and 8 decode steps, fed
    the source's tokens, or an embedding model's batches of texts. Its results (logits,
    embeddings) must stay within a tolerance (float32: 2e-3 of the largest value) of the run
    with every kernel on the source (llvm). All kernels are offloaded first; if that diverges,
    bisection over the order finds the first kernel that breaks the run (at most
    ceil(log2 N) + 2 runs), and that kernel's carved calls are replayed on the target. A
    rerun resumes from the evaluations already done. Exits 1 unless every kernel matches.

    \b
    Examples:
      tapml offload smollm2-135m --target webgpu
      tapml offload smollm2-135m --target opencl --device tapml://phone.local:9091
      tapml offload all-minilm-l6-v2 --target webgpu
    """
    from tapml.carving import report as reports
    from tapml.carving.workflow import artifacts, device_for, offload_model

    output = output or Path("offload") / f"{Path(model).name.removesuffix('.gguf')}-{target}"
    dirs = artifacts(model, target, quantization, bundle=bundle, progress=obj["progress"],
                     buckets=buckets)  # fmt: skip
    chosen = chosen_scenarios(dirs[0], scenario, prompt)[0]
    with device_for(target, device_url) as url:
        report = offload_model(model, target, url, chosen, output, quantization, order, bundle,
                               suite_dir, obj["progress"], artifact_dirs=dirs)  # fmt: skip
    click.echo(reports.offload_summary(report))
    alone = reports.alone_summary(report)
    if alone is not None:
        click.echo(alone)
    click.echo(f"report: {output / 'report.html'}", err=True)
    if not report["migrated"]:
        sys.exit(1)
