"""`alignkit data validate|convert|check|augment|split`: preference-data tools (seed 002 §4.2.3)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

_FORMAT_HELP = "prompt, sft, preference, safety, ratings or pairwise (auto-detected when omitted)."


def register(data: typer.Typer) -> None:
    """Add the preference-data commands to the ``data`` command group."""

    @data.command("validate")
    def validate(
        file: Path = typer.Argument(..., help="The data file (JSONL, JSON, CSV/TSV, Parquet)."),
        format: str | None = typer.Option(None, "--format", "-f", help=_FORMAT_HELP),
    ) -> None:
        """List every problem of FILE (row, field, what is wrong); exit 2 when there is any."""
        from alignkit.data.validate import FORMAT_ALIASES, validate_file
        from alignkit.errors import ConfigError

        if format is not None and format not in FORMAT_ALIASES:
            raise ConfigError(
                f"--format must be one of {', '.join(FORMAT_ALIASES)}, got {format!r}"
            )
        report = validate_file(file, format)
        console = Console(soft_wrap=True, highlight=False)
        for problem in report.problems:
            console.print(str(problem), markup=False)
        console.print(report.summary(), markup=False)
        if not report.ok:
            raise typer.Exit(2)
