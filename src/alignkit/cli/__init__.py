"""The `alignkit` command line. Thin: parse, load config, call a trainer or tool.

Errors a user can cause (`AlignkitError`) are printed in one or two lines with exit code 2,
never as a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from alignkit import __version__
from alignkit.errors import AlignkitError

app = typer.Typer(
    name="alignkit",
    help="Align language models with feedback: SFT, reward/cost models, the DPO family, Safe-DPO, "
    "online RL (PPO, GRPO, RLOO, REINFORCE++, Safe-PPO), data tools, evaluation, labelling.",
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


_registered = False


def _register_commands() -> None:
    # Imported here so `alignkit --help` stays fast and each command module owns its options.
    # Once per process: every registration adds the commands again (tests call main() often).
    global _registered
    if _registered:
        return
    _registered = True
    from alignkit.cli import (
        annotate,
        checks,
        data,
        generate,
        pipeline,
        quickstart,
        recommend,
        score,
        serve,
        train,
    )
    from alignkit.cli import eval as eval_commands

    train.register(app)
    score.register(app)
    quickstart.register(app)
    data.register(app)
    generate.register(app)
    checks.register(app)
    eval_commands.register(app)
    recommend.register(app)
    pipeline.register(app)
    annotate.register(app)
    serve.register(app)


def _method_help(args: list[str]) -> None:
    if len(args) >= 2 and args[0] == "train" and ("--help" in args or "-h" in args):
        from alignkit.cli.train import method_fields_help
        from alignkit.trainers.registry import METHODS

        if args[1] in METHODS:
            typer.echo("\n" + method_fields_help(args[1]))


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    _register_commands()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            app(args=args, prog_name="alignkit")
        except SystemExit as done:
            _method_help(args)  # typer printed `train`'s help; add the method's config keys
            raise done
    except AlignkitError as err:
        Console(stderr=True).print(
            f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
        )
        sys.exit(err.exit_code)
