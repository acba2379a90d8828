"""`tapml test`: replay a carved suite on a target and compare with the source's outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tapml.targets import TARGETS


@click.command("test")
@click.argument("suite", type=click.Path(file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(list(TARGETS)), default=None,
              help="Where to replay the calls [default: the bundle's target].")
@click.option("-k", "pattern", metavar="PATTERN", default=None,
              help="Only kernels whose name contains PATTERN (or matches it, with * ? [ ]).")
@click.option("--bundle", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None,
              help="Take the kernels from this compiled artifact or bundle instead of compiling "
              "the suite's model for --target.")
@click.option("--device", "device_url", metavar="URL", default=None,
              help="Run on a remote device: tapml://HOST:PORT, tvm-rpc://HOST:PORT[/KEY] or "
              "tvm-tracker://HOST:PORT/KEY [default: this machine].")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where report.json and report.html go [default: SUITE/reports/TARGET].")
@click.pass_obj
def command(obj, suite, target, pattern, bundle, device_url, report_dir) -> None:
    """Replay every call carved in SUITE on a target, and compare each output.

    Floats must agree within per-dtype tolerances (float32: 1e-3 relative plus 1e-4 of the
    output's largest value; float16: 1e-2 and 1e-3), integers exactly, and any NaN or Inf
    the source did not produce fails. On the suite's own source platform the outputs must be
    bit-identical (a determinism check). Exits with status 1 when any call fails or cannot
    run.

    \b
    Examples:
      tapml test carved/smollm2 --target webgpu
      tapml test carved/smollm2 --target opencl -k attention
      tapml test carved/smollm2 --target webgpu --device tapml://192.168.1.7:9091
    """
    from tapml.artifact import Artifact
    from tapml.carving import report as reports
    from tapml.carving.replay import compiled_for, matches, replay
    from tapml.carving.suite import Suite

    loaded = Suite.load(suite)
    target = _target(target, bundle)
    device = _device(target, device_url)  # before compiling: fail fast where it cannot run
    artifact = bundle or compiled_for(loaded, target, obj["progress"])
    Artifact(artifact).check()  # before its kernels load
    open_executor = _executors(target, artifact, device_url)
    result = replay(loaded, target, open_executor, device, lambda k: matches(pattern, k),
                    obj["progress"])
    if not result.calls:
        raise click.ClickException(f"no kernel in {suite} matches -k {pattern!r}")
    directory = report_dir or suite / "reports" / target
    json_path, html_path = reports.write(result, directory)
    click.echo(reports.table(result))
    click.echo(reports.summary(result))
    click.echo(f"report: {html_path} ({json_path.name} beside it)", err=True)
    if result.failed:
        sys.exit(1)


def _target(target: str | None, bundle: Path | None) -> str:
    """The target to test: --target, or the one the bundle's kernels were compiled for."""
    from tapml.artifact import describe

    if bundle is None:
        if target is None:
            raise click.ClickException("say which target to test: --target (or --bundle DIR)")
        return target
    built_for = describe(bundle)["options"]["target"]
    if target not in (None, built_for):
        raise click.ClickException(f"{bundle} holds {built_for} kernels, not {target}")
    return built_for


def _device(target: str, device_url: str | None) -> str:
    """What the kernels run on, for the report; an error if they cannot run here."""
    from tapml.targets import executes_here, get_target

    if device_url is None:
        runs, device = executes_here(get_target(target))
        if not runs:
            raise click.ClickException(f"{target} kernels cannot execute here: {device}")
        return device
    from tapml.targets.remote import device_info, parse_url

    if parse_url(device_url).scheme == "tapml":
        return f"{device_info(device_url)['device']} at {device_url}"
    return device_url


def _executors(target: str, artifact: Path, device_url: str | None):
    """A factory of executors for one-kernel plans, on the device or here."""
    if device_url is not None:
        from tapml.targets.remote import open_executor

        return lambda plan: open_executor(device_url, target, plan, artifact)
    from tapml.targets import load_executor

    return lambda plan: load_executor(target, plan, artifact)
