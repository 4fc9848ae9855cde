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

    @data.command("convert")
    def convert(
        source_file: Path = typer.Argument(..., metavar="IN", help="Input data file."),
        out: Path = typer.Argument(..., metavar="OUT", help="Output .jsonl or .json file."),
        source: str = typer.Option(
            ..., "--from", help="ratings, pairwise, preference, pku or safety (flattened)."
        ),
        target: str = typer.Option(..., "--to", help="preference, pairwise, safety or pku."),
        min_gap: float = typer.Option(0.5, help="ratings: the smallest rating gap kept as a pair."),
        max_pairs_per_prompt: int | None = typer.Option(
            None, help="ratings: keep at most this many pairs per prompt (largest gaps first)."
        ),
        keep_ties: bool = typer.Option(
            False, help="pairwise: keep ties (preference 0.5) with margin 0 instead of dropping."
        ),
    ) -> None:
        """Convert IN from one preference format to another; other columns are kept."""
        from alignkit.data.convert import CONVERSIONS, convert_rows
        from alignkit.data.output import write_rows
        from alignkit.data.validate import load_validated
        from alignkit.errors import ConfigError

        if (source, target) not in CONVERSIONS:
            known = ", ".join(f"{a}->{b}" for a, b in CONVERSIONS)
            raise ConfigError(f"no conversion --from {source} --to {target}; known: {known}")
        report = load_validated(source_file, CONVERSIONS[(source, target)][0])
        result = convert_rows(
            report.rows,
            source,
            target,
            min_gap=min_gap,
            max_pairs_per_prompt=max_pairs_per_prompt,
            keep_ties=keep_ties,
        )
        written = write_rows(out, result.rows)
        note = f" ({result.note})" if result.note else ""
        Console(soft_wrap=True, highlight=False).print(
            f"{out}: {written} {target} rows from {len(report.rows)} {source} rows{note}",
            markup=False,
        )
