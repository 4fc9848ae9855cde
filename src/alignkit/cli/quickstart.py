"""`alignkit quickstart`: SFT -> DPO and Safe-DPO on the bundled task, with a before/after table."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("quickstart")
    def quickstart(
        model: str = typer.Option(
            "tiny",
            help="'tiny' (built in, ~1 minute on a laptop CPU) or a fetched model such as "
            "smollm2-135m-instruct (run `alignkit models fetch` first; ~10 minutes on 2 CPU "
            "cores, prompts through its chat template).",
        ),
        out: Path = typer.Option(Path("runs/quickstart"), help="Where runs and data go."),
        seed: int = typer.Option(0, help="Seed of data, initialisation and order."),
    ) -> None:
        """Train SFT, then DPO and Safe-DPO from it, and compare them on held-out prompts; then
        GRPO on a verifiable task (tiny model only), with its before/after reward."""
        from transformers.utils import logging as hf_logging

        from alignkit.quickstart import run_quickstart

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load is noise
        run_quickstart(out, model=model, seed=seed)
