"""The one generation front-end: many prompts through an engine, in batches.

:func:`generate_batched` is what every caller that is not the online trainer's rollout uses
(evaluation, the trainers' held-out evaluation, ``alignkit generate``, the labelling server,
the quickstart): prompts are batched ``prompts_per_batch`` at a time, prompts of similar
length together (sorted by token count, so each batch carries little left padding), and the
result comes back as one ``Experience`` in the caller's order. :func:`generate_responses`
wraps it for texts in, texts out; :func:`completion_rows` / :func:`write_completions` turn an
``Experience`` into the JSONL rows ``alignkit generate`` writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alignkit.rollout.engine import GenerationEngine, TransformersEngine
from alignkit.rollout.experience import Experience
from alignkit.rollout.prompts import Prompt, prompts_from_records
from alignkit.rollout.sampling import SamplingConfig
from alignkit.tracking.io import atomic_write_text

__all__ = ["completion_rows", "generate_batched", "generate_responses", "write_completions"]

PromptText = str | Sequence[Mapping[str, str]]


def generate_batched(
    engine: GenerationEngine,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    prompts_per_batch: int,
    generator: torch.Generator,
    on_progress: Callable[[int, int], None] | None = None,
) -> Experience:
    """``sampling.samples_per_prompt`` samples of every prompt, ``prompts_per_batch`` prompts
    per ``engine.generate`` call, all random numbers from ``generator``.

    Rows come back grouped by prompt in the order of ``prompts``, ``group_index`` = the prompt's
    position; batches of several calls are joined with ``Experience.cat`` (aligned on the
    prompt/response boundary). With more prompts than one batch holds, prompts are batched in
    order of token count. ``on_progress(prompts done, prompts)`` follows each call.
    """
    if prompts_per_batch < 1:
        raise ValueError(f"prompts_per_batch must be >= 1, got {prompts_per_batch}")
    if not prompts:
        raise ValueError("generate_batched needs at least one prompt")
    order = list(range(len(prompts)))
    if len(prompts) > prompts_per_batch:
        order.sort(key=lambda i: len(prompts[i].input_ids))
    parts = []
    for start in range(0, len(order), prompts_per_batch):
        chunk = order[start : start + prompts_per_batch]
        parts.append(engine.generate([prompts[i] for i in chunk], sampling, generator=generator))
        if on_progress is not None:
            on_progress(start + len(chunk), len(prompts))
    if len(parts) == 1:
        return parts[0]
    g = sampling.samples_per_prompt
    exp = Experience.cat(parts)
    # Row r of the joined batch is sample r % g of prompt order[r // g]: invert that.
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    rows = (position[:, None] * g + torch.arange(g)).flatten()
    exp = exp.select(rows)
    exp.group_index = torch.arange(len(prompts), device=exp.group_index.device).repeat_interleave(g)
    return exp


def generate_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[PromptText],
    sampling: SamplingConfig | None = None,
    *,
    prompts_per_batch: int = 32,
    max_prompt_length: int | None = None,
    generator_seed: int | None = None,
) -> list[str]:
    """Generate for texts (or message lists); returns the decoded new texts, stripped, in the
    prompts' order (``samples_per_prompt`` per prompt, adjacent).

    ``sampling`` defaults to greedy decoding of up to 48 tokens. Prompts are rendered and
    tokenised as for training (``max_prompt_length`` keeps their end); special tokens are
    stripped from the output and generation stops at the tokenizer's EOS. ``generator_seed``
    seeds the sampling generator (0 when None; unused by greedy decoding; the global RNG is
    neither read nor reseeded).
    """
    if not prompts:
        return []
    sampling = sampling or SamplingConfig(max_new_tokens=48, temperature=0.0)
    items = prompts_from_records([{"prompt": p} for p in prompts], tokenizer, max_prompt_length)
    exp = generate_batched(
        TransformersEngine(model, tokenizer),
        items,
        sampling,
        prompts_per_batch=prompts_per_batch,
        generator=torch.Generator().manual_seed(0 if generator_seed is None else generator_seed),
    )
    return [text.strip() for text in exp.completions]


def completion_rows(exp: Experience, *, logprobs: bool = False) -> list[dict[str, Any]]:
    """One row per sampled sequence: ``prompt``, the prompt row's other columns,
    ``completion``, ``sample`` (0-based within its prompt), ``num_tokens``, ``truncated`` and,
    with ``logprobs``, the sampled ``token_ids``, their ``logprobs`` under the sampling
    distribution (6 decimals) and their sum ``logprob``."""
    response_ids = exp.input_ids[:, exp.prompt_width :].tolist()
    response_logprobs = exp.behaviour_logprobs[:, exp.prompt_width :]
    totals = response_logprobs.sum(dim=1).tolist()  # 0 off the response mask
    lengths, truncated = exp.response_lengths.tolist(), exp.truncated.tolist()
    groups = exp.group_index.tolist()
    rows: list[dict[str, Any]] = []
    for i, length in enumerate(lengths):
        sample = rows[-1]["sample"] + 1 if i and groups[i] == groups[i - 1] else 0
        row: dict[str, Any] = {
            "prompt": exp.prompts[i],
            **exp.row_fields[i],
            "completion": exp.completions[i],
            "sample": sample,
            "num_tokens": length,
            "truncated": bool(truncated[i]),
        }
        if logprobs:
            row["token_ids"] = response_ids[i][:length]
            row["logprobs"] = [round(v, 6) for v in response_logprobs[i, :length].tolist()]
            row["logprob"] = round(totals[i], 6)
        rows.append(row)
    return rows


def write_completions(path: str | Path, exp: Experience, *, logprobs: bool = False) -> int:
    """Write :func:`completion_rows` as JSONL to ``path`` atomically; returns the row count."""
    rows = completion_rows(exp, logprobs=logprobs)
    atomic_write_text(
        Path(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )
    return len(rows)
