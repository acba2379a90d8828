"""`tapml targets`: every target, and what this machine can do for it."""

from __future__ import annotations

import json

import click


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per target.")
def command(as_json: bool) -> None:
    """List the targets: each compiles here; whether it also executes here, and why.

    Metal and CUDA kernels are generated (and CUDA's compiled to PTX) on any machine but
    execute only on a Mac or an NVIDIA GPU: reports call them "generated, not executed".
    """
    from tapml.targets import TARGETS, executes_here

    rows = []
    for spec in TARGETS.values():
        executes, why = executes_here(spec)
        limits = spec.limits.__dict__ if spec.limits else None
        rows.append({
            "name": spec.name, "description": spec.description, "compiles": True,
            "executes": executes, "why": why, "f16": spec.f16, "limits": limits,
        })  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        state = "compiled and executed" if r["executes"] else "generated, not executed"
        click.echo(f"{r['name']:8} {state:24} {r['why']}")
