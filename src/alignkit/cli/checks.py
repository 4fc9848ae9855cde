"""`alignkit ops-check`: the command. The identities it runs are in `alignkit.cli.ops_check`,
imported when the command runs (it imports torch, which `alignkit --help` must not wait for)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command("ops-check")
    def ops_check(seed: int = typer.Option(0, help="Seed of the random test data.")) -> None:
        """Check identities of the algorithm maths (alignkit.ops) on random data."""
        from alignkit.cli.ops_check import run_checks

        results = run_checks(seed)
        table = Table(title="alignkit ops-check")
        for column in ("formula", "value", "expected", "ok"):
            table.add_column(column, justify="left" if column == "formula" else "right")
        for r in results:
            table.add_row(
                escape(r.formula),
                f"{r.value:.6g}",
                f"{r.expected:.6g}",
                "[green]ok[/]" if r.ok else "[red]FAIL[/]",
            )
        Console().print(table)
        failed = sum(not r.ok for r in results)
        if failed:
            Console(stderr=True).print(f"[red]{failed} check(s) failed[/]")
            raise typer.Exit(1)
