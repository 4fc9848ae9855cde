"""The `alignkit` command line. Thin: parse, load config, call a trainer or tool.

Errors a user can cause (`AlignkitError`) are printed in one or two lines with exit code 2,
never as a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from alignkit import __version__
from alignkit.errors import AlignkitError

app = typer.Typer(
    name="alignkit",
    help="Align language models with feedback: SFT, reward/cost models, DPO family, Safe-DPO.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"alignkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """alignkit: align language models with feedback."""


def _register_commands() -> None:
    # Imported here so `alignkit --help` stays fast and each command module owns its options.
    from alignkit.cli import (
        annotate,
        data,
        generate,
        ops_check,
        pipeline,
        quickstart,
        recommend,
        train,
    )
    from alignkit.cli import eval as eval_commands

    train.register(app)
    quickstart.register(app)
    data.register(app)
    generate.register(app)
    ops_check.register(app)
    eval_commands.register(app)
    recommend.register(app)
    pipeline.register(app)
    annotate.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    _register_commands()
    try:
        app(args=argv, prog_name="alignkit")
    except AlignkitError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
