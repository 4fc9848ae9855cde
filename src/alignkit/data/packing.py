"""Packing SFT examples into full rows without cross-contamination.

Several short examples share one row of ``max_length`` tokens, so a batch carries little
padding. Each example still sees only itself: the collator builds a block-diagonal causal
attention mask ``[B, 1, T, T]`` and restarts ``position_ids`` at every example, which gives the
same logits as running the examples separately (tested), on any attention backend that
accepts a 4D mask (eager, sdpa), not only flash-attention's varlen path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignkit.data.tokenize import IGNORE_INDEX


def pack_examples(
    examples: Sequence[Mapping[str, Any]], max_length: int
) -> list[dict[str, list[int]]]:
    """Greedy first-fit packing of ``{"input_ids","labels"}`` examples into rows.

    Examples are taken longest first (deterministic: ties keep input order) and each goes into
    the first row with room. Returns rows ``{"input_ids", "labels", "segment_lengths"}``.
    An example longer than ``max_length`` gets a row of its own (tokenisation already applied
    the length policy, so this only happens when packing uses a smaller limit).
    """
    if max_length < 1:
        raise ValueError("max_length must be >= 1")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[dict[str, list[int]]] = []
    room: list[int] = []
    for i in order:
        ids, labels = list(examples[i]["input_ids"]), list(examples[i]["labels"])
        target = next((r for r, free in enumerate(room) if free >= len(ids)), None)
        if target is None:
            rows.append({"input_ids": [], "labels": [], "segment_lengths": []})
            room.append(max_length)
            target = len(rows) - 1
        row = rows[target]
        row["input_ids"] += ids
        row["labels"] += labels
        row["segment_lengths"].append(len(ids))
        room[target] -= len(ids)
    return rows


@dataclass
class PackedSFTCollator:
    """Collate packed rows: right padding, block-diagonal causal mask, restarted positions.

    Returns ``input_ids``/``labels`` ``[B, T]``, ``attention_mask`` ``[B, 1, T, T]`` (bool,
    True = may attend), ``position_ids`` ``[B, T]``, ``token_mask`` ``[B, T]`` (1 on real
    tokens: the padding-free forward, ``models.forward.segment_logprobs``, runs from it and the
    positions instead of the 4D mask) and ``num_tokens`` (real tokens, for throughput). The
    first token of every example is masked out of ``labels``: it would otherwise be predicted
    from the previous example's last position.

    Example:
        >>> batch = PackedSFTCollator(pad_token_id=0)(
        ...     [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "segment_lengths": [2, 1]}])
        >>> batch["position_ids"]
        tensor([[0, 1, 0]])
        >>> batch["attention_mask"][0, 0].int()
        tensor([[1, 0, 0],
                [1, 1, 0],
                [0, 0, 1]], dtype=torch.int32)
        >>> batch["labels"]
        tensor([[-100,    6, -100]])
    """

    pad_token_id: int

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        segment = torch.full((batch, width), -1, dtype=torch.long)  # -1: padding
        positions = torch.zeros((batch, width), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            lengths = torch.tensor(row["segment_lengths"])
            starts = torch.cumsum(lengths, 0) - lengths
            segment[b, :n] = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            positions[b, :n] = torch.arange(n) - torch.repeat_interleave(starts, lengths)
            labels[b, starts] = IGNORE_INDEX
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_example = segment[:, :, None] == segment[:, None, :]
        real = segment >= 0
        attention = causal & same_example & real[:, :, None]
        # A padding query row with no allowed key gives NaN in softmax; let it see itself.
        attention |= torch.eye(width, dtype=torch.bool) & ~real[:, :, None]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention[:, None],
            "position_ids": positions,
            "token_mask": real.long(),
            "num_tokens": real.sum(),
        }
