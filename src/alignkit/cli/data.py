"""`alignkit data synthetic`: write the bundled "assistant safety" task and the verifiable RL
tasks as JSONL files."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    data = typer.Typer(
        help="Data tools: the synthetic task, validate, convert, check, augment, split, select.",
        no_args_is_help=True,
    )
    app.add_typer(data, name="data")
    from alignkit.cli import data_tools

    data_tools.register(data)

    @data.command("synthetic")
    def synthetic(
        out: Path = typer.Option(Path("data"), help="Directory to write the files into."),
        seed: int = typer.Option(0, help="Seed of prompts, answers and pairings."),
    ) -> None:
        """Write every file of the synthetic task (SFT, preference, safety, prompts, ratings),
        train and held-out splits, and of the verifiable RL tasks (reverse, sort, add: SFT
        warm-up, RL prompts with answers, held-out prompts); examples/*.yaml read them from data/."""
        from alignkit.data.synthetic import write_task, write_verifiable_tasks

        paths = {**write_task(out, seed=seed), **write_verifiable_tasks(out, seed=seed)}
        console = Console(soft_wrap=True)
        for path in paths.values():
            rows = path.read_text(encoding="utf-8").count("\n")
            console.print(f"{path}  {rows} rows", highlight=False)
        console.print(f"[green]wrote[/] {len(paths)} files into {out}")
