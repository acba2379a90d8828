"""`tapml device serve|info`: the device agent that runs ON a device, and what it reports."""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from tapml.targets import BACKENDS
from tapml.targets.remote.wire import IDLE_TIMEOUT, MAX_UPLOAD_MB
from tapml.targets.webgpu import WGPU_BACKENDS


@click.group("device")
def command() -> None:
    """Remote devices: run the tapml device agent on a device, ask one what it is.

    \b
    Examples:
      tapml device serve --backend wgpu --port 9091 --token-file ~/.tapml-token
      tapml device info tapml://192.168.1.20:9091
    """


def _token(token_file: str | None) -> str | None:
    from tapml.fileio import read_secret
    from tapml.targets.remote.wire import TOKEN_ENV

    if token_file:
        return read_secret(token_file, "token")
    return os.environ.get(TOKEN_ENV) or None


@command.command("serve")
@click.option("--backend", type=click.Choice(list(BACKENDS)), required=True,
              help="What runs the kernels: " + ", ".join(
                  f"{b.name} ({', '.join(b.targets)})" for b in BACKENDS.values()) + ".")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs a token.")
@click.option("--port", type=int, default=9091, show_default=True, help="0: any free port.")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="A file holding the shared token clients must send (else $TAPML_DEVICE_TOKEN).")
@click.option("--wgpu-backend", type=click.Choice(list(WGPU_BACKENDS)),
              help="Pin wgpu to one native API (default: wgpu's choice; Vulkan for vulkan).")
@click.option("--trust-native-code", is_flag=True,
              help="Accept native kernel libraries (.so: llvm, metal, cuda), which can run "
                   "anything on this machine; needs a token, loopback included.")
@click.option("--allow-no-token", is_flag=True,
              help="Serve a non-loopback address without a token (anyone who reaches it can "
                   "use the device).")
@click.option("--max-upload-mb", type=click.IntRange(min=1), default=MAX_UPLOAD_MB,
              show_default=True,
              help="Memory all clients together may hold in transfers in progress (plans, "
                   "kernels, buffers); a transfer past it is refused.")
@click.option("--idle-timeout", type=click.FloatRange(min=1), default=IDLE_TIMEOUT,
              show_default=True,
              help="Seconds a client may stay silent before its session is closed.")  # fmt: skip
def serve(backend: str, host: str, port: int, token_file: str | None, wgpu_backend: str | None,
          trust_native_code: bool, allow_no_token: bool, max_upload_mb: int,
          idle_timeout: float) -> None:  # fmt: skip
    """Serve this device to tapml clients until interrupted (Ctrl-C).

    Prints the agent's URL (tapml://HOST:PORT) on stdout once it listens. The agent runs only
    its narrow service: plans, kernel records and buffers; never Python code, and native
    libraries only with --trust-native-code, which needs a token even on loopback.
    """
    from tapml.errors import TapmlError
    from tapml.targets.remote.agent import Agent
    from tapml.targets.remote.server import is_loopback
    from tapml.targets.remote.server import serve as serve_agent

    token = _token(token_file)
    if not is_loopback(host) and token is None and not allow_no_token:
        raise TapmlError(f"refusing to serve {host} without a token: anyone who reaches it could "
                         "use this device. Give --token-file F (clients set TAPML_DEVICE_TOKEN), "
                         "or pass --allow-no-token")  # fmt: skip
    if wgpu_backend and backend != "wgpu":
        raise click.UsageError("--wgpu-backend goes with --backend wgpu")
    agent = Agent(backend, wgpu_backend, trust_native_code, token, max_upload_mb, idle_timeout)
    # SIGTERM ends the agent as Ctrl-C does, through the cleanup of its files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def ready(bound_host: str, bound_port: int) -> None:
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        click.echo(f"tapml://{shown}:{bound_port}")
        click.echo(f"tapml device agent: {backend} on {agent.info['device']}; token "
                   f"{'required' if token else 'not required'}; Ctrl-C stops it", err=True)

    try:
        serve_agent(agent, host, port, ready)
    except OSError as e:
        raise TapmlError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    except KeyboardInterrupt:
        click.echo("tapml device agent stopped", err=True)


@command.command("info")
@click.argument("url")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="The agent's token (else $TAPML_DEVICE_TOKEN).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the agent's report as JSON.")
def info(url: str, token_file: str | None, timeout: float, as_json: bool) -> None:
    """The device, backend and limits of the agent at URL (tapml://HOST:PORT)."""
    from tapml.targets.remote import device_info

    report = device_info(url, token=_token(token_file), timeout=timeout)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(f"device:   {report['device']}")
    click.echo(f"backend:  {report['backend']} (targets: {', '.join(report['targets'])})")
    click.echo(f"protocol: {report['protocol']}; native code "
               f"{'accepted' if report['trust_native_code'] else 'refused'}")  # fmt: skip
    for key, value in sorted(report.get("limits", {}).items()):
        click.echo(f"  {key}: {value}")
    if report.get("features"):
        click.echo(f"features: {', '.join(report['features'])}")
