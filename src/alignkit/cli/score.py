"""`alignkit score MODEL FILE`: score prompt/answer rows with a trained reward or cost model."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("score")
    def score(
        model: Path = typer.Argument(
            ..., help="A reward/cost model directory, or the run directory of `train rm`/`cost`."
        ),
        data: Path = typer.Argument(
            ..., help='Rows {"prompt", "completion"} (or {"messages"}), any supported file type.'
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Write the rows with a `score` field here (JSONL)."
        ),
        batch_size: int = typer.Option(64, help="Sequences per forward pass."),
    ) -> None:
        """Score each row's completion; prints the rows' scores (JSONL) or writes --out."""
        from alignkit.data import load_records
        from alignkit.rollout.rewards import ModelReward
        from alignkit.tracking.io import atomic_write_text

        scorer = ModelReward(model, batch_size=batch_size)
        records = load_records(data, "sft")
        prompts = [r["prompt"] for r in records]
        completions = [r["completion"] for r in records]
        scores = scorer(prompts, completions, []).tolist()
        rows = [
            {"row": row, "prompt": p, "completion": c, "score": s}
            for row, p, c, s in zip(records.rows, prompts, completions, scores, strict=True)
        ]
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if out is None:
            typer.echo(lines, nl=False)
            return
        atomic_write_text(out, lines)
        mean = sum(scores) / len(scores)
        typer.echo(f"{len(rows)} rows scored by the {scorer.kind} model (mean {mean:.4f}): {out}")
