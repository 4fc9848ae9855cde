"""The one way texts are scored by a sequence model (reward and cost models, ensembles, the
teacher log-ratio reward): ``prompt + completion`` tokenised as in training, right-padded
batches handed to a scoring function. Re-exported by ``models.reward``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.data.collate import SFTCollator
from alignkit.data.tokenize import IGNORE_INDEX, tokenize_sft

__all__ = ["score_texts", "text_length_limit"]

#: transformers sets ``model_max_length`` to int(1e30) when a tokenizer declares no limit.
_NO_LIMIT = 1_000_000


def text_length_limit(tokenizer: Any, max_length: int | None = None) -> int | None:
    """``max_length``, else the tokenizer's ``model_max_length`` unless that is transformers'
    "no limit" sentinel; None means no limit."""
    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    return None if limit is None or limit > _NO_LIMIT else int(limit)


@torch.inference_mode()
def score_texts(
    score_batch: Callable[[dict[str, Tensor]], Tensor],
    tokenizer: Any,
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    batch_size: int,
    max_length: int | None = None,
    assistant_turns: str = "last",
    on_progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """``[..., N]`` scores of ``prompt + completion`` texts, tokenised exactly as in training.

    Each text is ``data.tokenize.tokenize_sft`` of ``{"prompt", "completion"}``: the prompt (a
    string or messages) rendered as for training, the completion's ids, EOS; longer than
    :func:`text_length_limit` ``(tokenizer, max_length)`` tokens, the prompt's start is cut.
    With ``assistant_turns="last"`` only the completion is the response (``response_mask``):
    earlier assistant turns of a message-list prompt are part of the prompt. ``score_batch``
    gets right-padded CPU batches ``{"input_ids", "attention_mask", "response_mask"}`` of up
    to ``batch_size`` texts and returns ``[..., b]`` scores; they are concatenated along the
    last dim. ``on_progress(done, total)`` is called after each batch.
    """
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    examples = tokenize_sft(
        records,
        tokenizer,
        max_length=text_length_limit(tokenizer, max_length),
        assistant_turns=assistant_turns,
    )
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    parts = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        parts.append(
            score_batch(
                {
                    "input_ids": batch["input_ids"],
                    "attention_mask": batch["attention_mask"],
                    "response_mask": batch["labels"] != IGNORE_INDEX,
                }
            )
        )
        if on_progress is not None:
            on_progress(min(start + batch_size, len(examples)), len(examples))
    return torch.cat(parts, dim=-1)
