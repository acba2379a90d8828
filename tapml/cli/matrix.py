"""`tapml matrix`: every stage for every model on every target, as one table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tapml.matrix import STAGES
from tapml.models import MODELS
from tapml.targets import TARGETS


@click.command("matrix")
@click.option("--model", "models", multiple=True, type=click.Choice(list(MODELS)),
              help="A model of the zoo (repeatable) [default: all of them].")
@click.option("--target", "targets", multiple=True, type=click.Choice(list(TARGETS)),
              help="A target (repeatable) [default: all of them].")
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGES),
              help="A stage (repeatable) [default: all of them, in order].")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              default=Path("matrix"), show_default=True,
              help="Where results (matrix.json), suites, reports and bundles go.")
@click.option("--fresh", is_flag=True, help="Run every stage again instead of resuming.")
@click.option("--json", "as_json", is_flag=True, help="Print every stage's result as JSON.")
@click.pass_obj
def command(obj, models, targets, stages, output, fresh, as_json) -> None:
    """Run each stage of the method (compile, run, carve, test, offload, package, bench) for
    models of the zoo on targets, and print a model x target table: "pass", the first
    failing stage and its message, or "compiled, not executed" where this machine cannot run
    the target. Results are kept in OUTPUT/matrix.json as they come: a second run resumes.
    Exits 1 if any stage fails.

    \b
    Examples:
      tapml matrix
      tapml matrix --model smollm2-135m --target llvm --target webgpu
      tapml matrix --stage compile --stage run --json
    """
    from tapml.matrix import Matrix, table

    models, targets = list(models or MODELS), list(targets or TARGETS)
    matrix = Matrix(output, fresh=fresh, progress=obj["progress"])
    cells = matrix.run(models, targets, stages or STAGES)
    if as_json:
        click.echo(json.dumps([{"model": c.model, "target": c.target, "summary": c.summary,
                                "stages": c.stages} for c in cells], indent=1))  # fmt: skip
    else:
        click.echo(table(cells, targets))
    if any(r["status"] == "fail" for c in cells for r in c.stages.values()):
        sys.exit(1)
