"""`alignkit eval rm|policy`: evaluate reward/cost models, ensembles and policies."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def _print_table(title: str, report: dict, console: Console) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def add(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}/{key}" if prefix else str(key), inner)
        elif isinstance(value, float):
            table.add_row(prefix, f"{value:.4f}")
        elif not isinstance(value, list):
            table.add_row(prefix, str(value))

    add("", report)
    console.print(table)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Evaluate reward models, ensembles and policies.", no_args_is_help=True
    )
    app.add_typer(group, name="eval")

    @group.command("rm")
    def rm(
        model: Path = typer.Argument(..., help="A reward/cost model, its run, or an ensemble run."),
        data: Path = typer.Argument(..., help="Preference, safety or ratings data."),
        format: str | None = typer.Option(
            None, "--format", "-f", help="preference, safety or ratings (auto-detected)."
        ),
        out_dir: Path = typer.Option(Path("eval/rm"), help="Where report.json and PNGs go."),
        combination: str = typer.Option(
            "mean", help="Ensemble: mean, weighted, median, trimmed_mean or stacking."
        ),
        penalty: float = typer.Option(0.0, help="Ensemble: score = combined - penalty * std."),
        bins: int = typer.Option(10, min=2, help="Calibration bins."),
        device: str | None = typer.Option(None, help="Where the model runs (default cpu)."),
    ) -> None:
        """Accuracy, margin buckets, Kendall's tau, calibration, robustness, length bias."""
        from alignkit.config import atomic_write_text
        from alignkit.data.validate import load_validated
        from alignkit.errors import ConfigError
        from alignkit.eval.reward_model import evaluate_reward_model, pairs_from_records
        from alignkit.models.ensemble import load_reward_source

        report_in = load_validated(data, format)
        if report_in.format not in ("preference", "safety", "ratings"):
            raise ConfigError(f"{data}: eval rm reads preference, safety or ratings data")
        source = load_reward_source(model, combination=combination, penalty=penalty, device=device)
        records = [r.record for r in report_in.rows]
        pairs = pairs_from_records(records, report_in.format, source.kind, str(data))
        report = evaluate_reward_model(source, pairs, out_dir, bins)
        report["data"] = str(data)
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
        console = Console(soft_wrap=True)
        _print_table(f"{source.name} on {data}", report, console)
        console.print(f"report: {out_dir / 'report.json'}", highlight=False)
