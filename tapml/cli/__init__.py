"""The tapml command line: `tapml COMMAND --help` explains each step of the workflow."""

from __future__ import annotations

import logging
import sys

import click

from tapml import __version__
from tapml.errors import TapmlError


class _Group(click.Group):
    """Lists commands in workflow order; shows TapmlError as a one-line message and exit code
    1, without a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # the workflow's order, not the alphabet's

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


def _register() -> None:
    from . import (
        bench,
        cache,
        carve,
        chat,
        compile,
        device,
        embed,
        matrix,
        migrate,
        models,
        ocr,
        offload,
        package,
        run,
        serve,
        targets,
        test,
        verify,
    )

    # in the order of the user's workflow, as `tapml --help` lists them
    for module in (models, targets, compile, run, chat, embed, ocr, carve, test, offload, migrate,
                   device, package, serve, verify, bench, matrix, cache):
        main.add_command(module.command)


_register()
