"""`alignkit generate MODEL PROMPTS --out FILE`: sample completions to JSONL."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def generate_file(
    model_name: str,
    prompts_path: Path,
    out: Path,
    *,
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 64,
    logprobs: bool = False,
    seed: int = 0,
    prompts_per_batch: int = 64,
    max_prompt_length: int | None = None,
) -> int:
    """Write ``samples`` completions per prompt of ``prompts_path`` to ``out`` (atomically; the
    rows of ``rollout.completion_rows``); returns the number of rows."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from alignkit.errors import ConfigError
    from alignkit.models import load_policy
    from alignkit.models.loading import resolve_run_model
    from alignkit.rollout import (
        SamplingConfig,
        TransformersEngine,
        generate_batched,
        load_prompt_file,
        write_completions,
    )

    try:
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            samples_per_prompt=samples,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if prompts_per_batch < 1:
        raise ConfigError(f"--prompts-per-batch must be >= 1, got {prompts_per_batch}")
    path, note = resolve_run_model(model_name)  # a run directory: its best or final checkpoint
    if note:
        Console(soft_wrap=True).print(note, markup=False, highlight=False)
    model, tokenizer = load_policy(path)
    prompts = load_prompt_file(prompts_path, tokenizer, max_length=max_prompt_length)
    columns = (TimeRemainingColumn(), BarColumn(), MofNCompleteColumn())
    with Progress(*Progress.get_default_columns()[:1], *columns, transient=True) as progress:
        task = progress.add_task("generating", total=len(prompts))
        exp = generate_batched(
            TransformersEngine(model, tokenizer),
            prompts,
            sampling,
            prompts_per_batch=prompts_per_batch,
            generator=torch.Generator().manual_seed(seed),
            on_progress=lambda done, _: progress.update(task, completed=done),
        )
    return write_completions(out, exp, logprobs=logprobs)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        model: str = typer.Argument(
            ..., help="'tiny', a model directory, a fetched model, or a run (its best or final)."
        ),
        prompts: Path = typer.Argument(..., help="Prompt file ({'prompt', ...other columns})."),
        out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write."),
        samples: int = typer.Option(1, "--samples", "-n", help="Completions per prompt."),
        temperature: float = typer.Option(1.0, help="0 = greedy decoding."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
        top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = off)."),
        max_new_tokens: int = typer.Option(64, help="Cap on generated tokens."),
        logprobs: bool = typer.Option(
            False, "--logprobs", help="Also write token ids and their sampling log-probs."
        ),
        seed: int = typer.Option(0, help="Seed of the sampling generator."),
        prompts_per_batch: int = typer.Option(64, help="Prompts per generation batch."),
        max_prompt_length: int | None = typer.Option(
            None, help="Keep only the last N tokens of longer prompts."
        ),
    ) -> None:
        """Sample completions for every prompt of a file and write them as JSONL."""
        rows = generate_file(
            model,
            prompts,
            out,
            samples=samples,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            logprobs=logprobs,
            seed=seed,
            prompts_per_batch=prompts_per_batch,
            max_prompt_length=max_prompt_length,
        )
        Console(soft_wrap=True).print(f"[green]wrote[/] {rows} rows to {out}", highlight=False)
