"""`annotate generate`: responses from the user's own checkpoints, several sampling settings each.

Each model is loaded once (`load_policy`: a preset, a fetched model, a local directory or run
checkpoint, or a LoRA adapter directory) and generates for every prompt with alignkit's batched
KV-cache generation (`rollout.generate_responses`). Every response records its model, settings
and seed; an exact duplicate of a response already stored for the same prompt is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from alignkit.annotate.db import Database
from alignkit.annotate.ingest import NewResponse, add_responses
from alignkit.annotate.limits import check_number
from alignkit.annotate.schema import Prompt
from alignkit.errors import AlignkitError

__all__ = ["GenerateReport", "generate"]


def resolve_checkpoint(name: str) -> str:
    """A run directory means its newest complete checkpoint's model (``<run>/checkpoints/step-N/
    model``), a checkpoint directory its ``model`` subdirectory; anything else is left as it is
    for `load_policy` (preset, fetched model, HF directory, LoRA adapter directory)."""
    from alignkit.tracking.checkpoint import latest_checkpoint

    path = Path(name).expanduser()
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise AlignkitError(f"--model {name}: run directory without a complete checkpoint")
        path = latest
    if (path / "model").is_dir() and not (path / "config.json").is_file():
        return str(path / "model")
    return name if path == Path(name).expanduser() else str(path)


@dataclass(frozen=True)
class GenerateReport:
    generated: int
    added: int  # after deduplication

    @property
    def duplicates(self) -> int:
        return self.generated - self.added


def generate(
    db: Database,
    models: Sequence[str],
    temperatures: Sequence[float] = (0.7, 1.0),
    samples: int = 2,
    max_new_tokens: int = 128,
    top_p: float = 1.0,
    seed: int = 0,
    prompts_per_batch: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> GenerateReport:
    """Generate ``samples`` responses per prompt, model and temperature; store the new ones.

    The seed of sample ``s`` at temperature index ``t`` is ``seed + 1000 * t + s`` (the same for
    every model, so two checkpoints are compared on the same random draws).
    """
    from alignkit.models.loading import load_policy
    from alignkit.rollout import SamplingConfig, generate_responses

    if not models:
        raise AlignkitError("generate: give at least one --model")
    if not temperatures:
        raise AlignkitError("generate: give at least one --temperature")
    for t in temperatures:
        check_number("--temperature", t, 0, 100)
    check_number("--samples", samples, 1, 1000, integer=True)
    check_number("--max-new-tokens", max_new_tokens, 1, 1_000_000, integer=True)
    check_number("--seed", seed, 0, 2**31 - 1, integer=True)
    try:
        settings_list = [
            SamplingConfig(max_new_tokens=max_new_tokens, temperature=t, top_p=top_p)
            for t in temperatures
        ]
    except ValueError as err:
        raise AlignkitError(f"generate: {err}") from None
    if prompts_per_batch < 1:
        raise AlignkitError(f"generate: prompts_per_batch must be >= 1, got {prompts_per_batch}")
    with db.read() as session:
        rows = [
            (p.id, json.loads(p.prompt_json))
            for p in session.scalars(
                select(Prompt)
                .where(Prompt.category != "gold", Prompt.gold_donor.is_(False))
                .order_by(Prompt.id)
            )
        ]
    if not rows:
        raise AlignkitError(
            "generate: the database has no prompts; run `alignkit annotate import-prompts` first"
        )
    prompt_ids, prompts = [r[0] for r in rows], [r[1] for r in rows]
    total_steps = len(models) * len(settings_list) * samples
    generated = added = step = 0
    for model_name in models:
        location = resolve_checkpoint(model_name)
        model, tokenizer = load_policy(location)
        for t_index, settings in enumerate(settings_list):
            for sample in range(samples):
                sample_seed = seed + 1000 * t_index + sample
                texts = generate_responses(
                    model,
                    tokenizer,
                    prompts,
                    settings,
                    prompts_per_batch=prompts_per_batch,
                    generator_seed=sample_seed,
                )
                recorded = {  # the keys stored since the first database version
                    "max_new_tokens": settings.max_new_tokens,
                    "temperature": settings.temperature,
                    "top_p": settings.top_p,
                    "top_k": settings.top_k,
                    "max_prompt_length": None,
                    "checkpoint": location,
                }
                new = [
                    NewResponse(pid, text, model_name, recorded, sample_seed)
                    for pid, text in zip(prompt_ids, texts, strict=True)
                ]
                with db.write() as session:
                    added += len(add_responses(session, new))
                generated += len(new)
                step += 1
                if progress is not None:
                    progress(step, total_steps)
        del model
    return GenerateReport(generated=generated, added=added)
