"""Prompts for generation: ``Prompt`` and the one prompt-file loader.

A prompt file is any file ``data.load_records`` reads, validated as the ``prompt`` format
(``{"prompt": text | messages}``); each row's other columns (e.g. ``answer``) are kept as the
prompt's ``fields`` and reach reward functions as keyword arguments. Prompts are rendered and
tokenised exactly as for training (``data.tokenize``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from alignkit.data.loaders import load_records
from alignkit.data.tokenize import render_prompt, tokenize_prompts

__all__ = ["Prompt", "load_prompt_file", "prompts_from_records"]


@dataclass
class Prompt:
    """A prompt: its text, its token ids (rendered and tokenised as for training), its row's
    other columns (passed to reward functions as keyword arguments) and, for a conversational
    row, its message list (what reward functions get as the prompt, as in TRL)."""

    text: str
    input_ids: list[int]
    fields: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None


def prompts_from_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
) -> list[Prompt]:
    """``Prompt``s from rows with a ``prompt`` field (a string or a message list), rendered
    and tokenised exactly as for training; the row's other columns become ``fields``."""
    examples = tokenize_prompts(records, tokenizer, max_length=max_length)
    return [
        Prompt(
            text=render_prompt(tokenizer, r["prompt"]),
            input_ids=list(e["input_ids"]),
            fields={k: v for k, v in r.items() if k != "prompt"},
            messages=None if isinstance(r["prompt"], str) else list(r["prompt"]),
        )
        for r, e in zip(records, examples, strict=True)
    ]


def load_prompt_file(
    path: str | Path | Any,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """``Prompt``s of a prompt file (or an in-memory `datasets.Dataset`), validated as the
    ``prompt`` format, each row's other columns kept as ``fields``; the first ``limit`` rows
    only when given. ``max_length`` keeps the end of longer prompts."""
    records = load_records(path, "prompt", split=split, keep_fields="all")
    if limit is not None:
        records = records[:limit]
    return prompts_from_records(records, tokenizer, max_length=max_length)
