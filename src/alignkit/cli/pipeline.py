"""`alignkit pipeline FILE [--from STAGE]`: run a multi-stage pipeline."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline(
        file: Path = typer.Argument(..., help="Pipeline YAML (see examples/pipelines/)."),
        from_stage: str | None = typer.Option(
            None, "--from", help="Re-run this stage and every later one from scratch."
        ),
    ) -> None:
        """Run the stages of FILE in order: finished stages (same resolved config) are skipped,
        an interrupted stage resumes from its last checkpoint, a failed one stops the run."""
        from rich.console import Console

        from alignkit.pipeline import load_pipeline, run_pipeline, summary_table

        console = Console(soft_wrap=True)
        spec = load_pipeline(file)
        records = run_pipeline(spec, from_stage, console)
        console.print(summary_table(records))
        console.print(f"pipeline directory: {spec.root}", markup=False)
