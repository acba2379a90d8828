"""`tapml carve`: unit tests carved from real runs of a model on the source platform."""

from __future__ import annotations

from pathlib import Path

import click

from tapml.carving.scenarios import BY_TASK, NAMES, TASKS

from .options import (
    buckets_option,
    quantization_option,
    refuse_artifact_conflicts,
    threads_option,
)


@click.command("carve")
@click.argument("model")
@click.option(
    "--source", type=click.Choice(["llvm", "cuda"]), default="llvm", show_default=True,
    help="The mature platform whose kernel calls become the reference (cuda needs a GPU).",
)
@quantization_option
@buckets_option
@click.option(
    "--scenario", "scenarios", multiple=True, type=click.Choice(NAMES),
    help="A built-in scenario of the model's task (repeatable) [default: all of them]: "
    + "; ".join(f"{', '.join(s)} for {TASKS[kind]}" for kind, s in BY_TASK.items()) + ".",
)
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Carve a run of this prompt (a text to embed) too (repeatable).")
@click.option("--prompt-file", "prompt_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Carve a run of the prompt in this file (repeatable).")
@click.option(
    "--max-calls-per-kernel", type=click.IntRange(1), default=3, show_default=True,
    help="Calls kept per kernel and scenario, chosen to cover distinct scalars and layers.",
)
@click.option(
    "-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Suite directory [default: carved/MODEL-QUANTIZATION-SOURCE].",
)
@threads_option
@click.pass_obj
def command(obj, model, source, quantization, buckets, scenarios, prompts, prompt_files,
            max_calls_per_kernel, output, threads) -> None:  # fmt: skip
    """Run MODEL on the source platform and record its kernel calls as a test suite.

    Each scenario runs on the source: a causal LM's prompt is prefilled and 8 greedy tokens
    decoded; an embedding model embeds texts, batched into its compiled buckets. Up to
    --max-calls-per-kernel calls of every kernel are kept with all their inputs and
    outputs. An interrupted carve resumes where it stopped when run again.

    \b
    Examples:
      tapml carve smollm2-135m -o carved/smollm2
      tapml carve smollm2-135m --scenario chat --prompt "Write a limerick." -o carved/mine
      tapml carve all-minilm-l6-v2 --scenario search -o carved/minilm
      tapml test carved/smollm2 --target webgpu
    """
    from tapml.artifact import Artifact, describe
    from tapml.carving.carve import carve
    from tapml.carving.scenarios import select
    from tapml.carving.workflow import reference_source
    from tapml.targets import executes_here, get_target
    from tapml.targets.llvm import use_threads

    refuse_artifact_conflicts(model, source="target")
    runs, why = executes_here(get_target(source))
    if not runs:
        raise click.ClickException(f"cannot carve on {source} here: {why}")
    use_threads(threads)
    texts = list(prompts) + [p.read_text() for p in prompt_files]
    # a suite replays on any target: carve the plan every target holds, computed as they do
    artifact = reference_source(model, source, quantization, obj["progress"], buckets=buckets)
    chosen = select(scenarios, texts, Artifact(artifact).plan().task["kind"])
    if output is None:
        quantization = describe(artifact)["options"]["quantization"]
        name = Path(model).name.removesuffix(".gguf")
        output = Path("carved") / f"{name}-{quantization}-{source}"
    suite = carve(artifact, output, chosen, model, max_calls_per_kernel, obj["progress"])
    m = suite.manifest
    seen = sum(k["calls"] for k in m["kernels"].values())
    click.echo(
        f"carved {len(m['calls'])} of {seen} calls ({len(m['kernels'])} kernels, scenarios "
        f"{', '.join(s['name'] for s in m['scenarios'])}) into {output}: "
        f"{suite.arrays.nbytes() / 2**20:.1f} MiB", err=True,
    )
    click.echo(str(output))
