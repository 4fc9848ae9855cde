"""Collators: turn lists of tokenised examples into padded tensors.

Padding is built without a Python loop over tokens: all ids are concatenated once, and a
position mask computed from the lengths scatters them into the padded tensor (row-major order
matches the concatenation for right and for left padding alike).

Scalar per-example fields other than the ids (``margin``, safety scores and labels, an
``index`` for cached reference log-probs, ...) are passed through: numbers and booleans as
tensors of shape ``[batch]``, anything else as a list.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.data.tokenize import IGNORE_INDEX

__all__ = ["PreferenceCollator", "PromptCollator", "SFTCollator"]


def _padded_length(lengths: Tensor, multiple: int | None) -> int:
    longest = int(lengths.max()) if lengths.numel() else 0
    if multiple:
        longest = -(-longest // multiple) * multiple
    return longest


def _scatter(
    rows: Sequence[Sequence[int]], pad_value: int, multiple: int | None, left: bool = False
) -> tuple[Tensor, Tensor]:
    """``(padded [N, T] long tensor, attention mask [N, T])`` from ragged id lists."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = _padded_length(lengths, multiple)
    positions = torch.arange(width)
    mask = positions >= (width - lengths)[:, None] if left else positions < lengths[:, None]
    padded = torch.full((len(rows), width), pad_value, dtype=torch.long)
    padded[mask] = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    return padded, mask.long()


def _passthrough(examples: Sequence[Mapping[str, Any]], skip: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in examples[0]:
        if key in skip:
            continue
        values = [e[key] for e in examples]
        if all(isinstance(v, (bool, int, float)) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


@dataclass
class SFTCollator:
    """Right-pad SFT examples ``{"input_ids", "labels"}``; labels are padded with -100.

    Example:
        >>> collate = SFTCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        ...                  {"input_ids": [8, 9], "labels": [-100, 9]}])
        >>> batch["input_ids"]
        tensor([[5, 6, 7],
                [8, 9, 0]])
        >>> batch["attention_mask"]
        tensor([[1, 1, 1],
                [1, 1, 0]])
        >>> batch["labels"]
        tensor([[-100,    6,    7],
                [-100,    9, -100]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        input_ids, attention_mask = _scatter(ids, self.pad_token_id, self.pad_to_multiple_of)
        labels, _ = _scatter([e["labels"] for e in examples], IGNORE_INDEX, self.pad_to_multiple_of)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update(_passthrough(examples, {"input_ids", "labels"}))
        return batch


@dataclass
class PreferenceCollator:
    """One forward batch of ``2B`` rows for ``B`` pairs: the B chosen rows, then the B rejected.

    Each row is prompt + answer, right-padded. ``response_mask`` is 1 on the answer's tokens,
    aligned with ``input_ids`` (log-prob code shifts it once, with the logits). Other scalar
    fields of the examples (``margin``, ``chosen_safety``, ...) come back as ``[B]`` tensors.

    Example:
        >>> collate = PreferenceCollator(pad_token_id=0)
        >>> batch = collate([{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8],
        ...                   "margin": 0.5}])
        >>> batch["input_ids"]
        tensor([[5, 6, 7, 2],
                [5, 6, 8, 0]])
        >>> batch["response_mask"]
        tensor([[0, 0, 1, 1],
                [0, 0, 1, 0]])
        >>> batch["attention_mask"]
        tensor([[1, 1, 1, 1],
                [1, 1, 1, 0]])
        >>> batch["margin"]
        tensor([0.5000])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        prompts = [e["prompt_ids"] for e in examples]
        answers = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        rows = [list(p) + list(a) for p, a in zip(prompts + prompts, answers, strict=True)]
        input_ids, attention_mask = _scatter(rows, self.pad_token_id, self.pad_to_multiple_of)
        starts = torch.tensor([len(p) for p in prompts + prompts])
        ends = starts + torch.tensor([len(a) for a in answers])
        positions = torch.arange(input_ids.shape[1])
        response_mask = (positions >= starts[:, None]) & (positions < ends[:, None])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask.long(),
        }
        batch.update(_passthrough(examples, {"prompt_ids", "chosen_ids", "rejected_ids"}))
        return batch


@dataclass
class PromptCollator:
    """Left-pad prompts ``{"input_ids"}`` for generation (new tokens then follow every prompt).

    Example:
        >>> collate = PromptCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
        >>> batch["input_ids"]
        tensor([[5, 6, 7],
                [0, 0, 8]])
        >>> batch["attention_mask"]
        tensor([[1, 1, 1],
                [0, 0, 1]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        input_ids, attention_mask = _scatter(
            ids, self.pad_token_id, self.pad_to_multiple_of, left=True
        )
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update(_passthrough(examples, {"input_ids"}))
        return batch
