"""`tapml migrate`: the whole TapML method for one model and one target."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .offload import chosen_scenarios, migration_options


@click.command("migrate")
@click.argument("model")
@migration_options
@click.option("--carve-all", is_flag=True,
              help="Carve every built-in scenario, not just the evaluation one.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the suite and reports go [default: migrated/MODEL-TARGET].")
@click.pass_obj
def command(obj, model, target, device_url, quantization, buckets, order, scenario, prompt,
            carve_all, output) -> None:  # fmt: skip
    """Migrate MODEL to a target: compile, carve, test, offload, run on the target alone.

    \b
    1. compile MODEL for llvm (the source) and the target;
    2. carve unit tests from real runs on llvm;
    3. replay them on the target device, kernel by kernel;
    4. offload the model's kernels to the device step by step (bisecting to the first bad
       kernel if the results diverge), then run on the target alone: generate (a causal LM)
       or embed the scenario's texts (an embedding model).
    Without --device a device agent is started on this machine. Exits 1 unless every
    carved test passes and every kernel runs on the target.

    \b
    Examples:
      tapml migrate smollm2-135m --target webgpu
      tapml migrate smollm2-135m --target opencl --device tapml://phone.local:9091
      tapml migrate all-minilm-l6-v2 --target webgpu --carve-all
    """
    from tapml.carving import report as reports
    from tapml.carving.workflow import artifacts, migrate_model

    output = output or Path("migrated") / f"{Path(model).name.removesuffix('.gguf')}-{target}"
    dirs = artifacts(model, target, quantization, progress=obj["progress"], buckets=buckets)
    scenarios = chosen_scenarios(dirs[0], scenario, prompt, carve_all)
    report = migrate_model(model, target, device_url, output, scenarios, quantization, order,
                           obj["progress"], artifact_dirs=dirs)  # fmt: skip
    click.echo(reports.migration_summary(report), err=True)
    click.echo(f"report: {output / 'report.html'}", err=True)
    if report.get("completion") is not None:
        click.echo(report["completion"])
    elif report.get("embeddings") is not None:
        click.echo(reports.alone_summary(report))
    if not report["migrated"]:
        sys.exit(1)
