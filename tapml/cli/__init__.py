"""The tapml command line: `tapml COMMAND --help` explains each step of the workflow."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from tapml import __version__
from tapml.errors import TapmlError

# each command's module (tapml/cli/NAME.py), in the order of the user's workflow, as `tapml
# --help` lists them
COMMANDS = ("models", "targets", "compile", "run", "chat", "embed", "ocr", "carve", "test",
            "offload", "migrate", "device", "package", "serve", "verify", "bench", "matrix",
            "cache")  # fmt: skip


class _Group(click.Group):
    """Lists commands in workflow order and imports only the one that runs (`tapml run` does
    not pay for the others' imports); shows TapmlError as a one-line message and exit code
    1, without a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"{__name__}.{name}").command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TapmlError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tapml")
@click.option("-v", "--verbose", is_flag=True, help="Log every step, TVM's warnings included.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and results: no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """tapml: bring ML models to new platforms, top-down.

    \b
    Examples:
      tapml models
      tapml run smollm2-135m --prompt "The capital of France is"
      tapml compile smollm2-135m --target llvm --quantization q4f32_1 -o dist/smollm2
      tapml bench smollm2-135m --json
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tapml: %(message)s"))
    log = logging.getLogger("tapml")
    log.handlers = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    ctx.obj = {"progress": not quiet}
