"""``Experience``: one batch of sampled sequences and everything the trainer computes on them.

Layout (binding, see INTERFACES.md): row i is one sampled sequence. ``input_ids[i]`` is the
prompt LEFT-padded to a common width ``prompt_width`` (P), then the response RIGHT-padded, so
every response starts at column P. Per-token tensors are ``[N, T]`` and aligned with
``input_ids``: the value at column t concerns token ``input_ids[i, t]`` (its log-prob is read
from the logits at t - 1, as in ``alignkit.ops.sequence_logprobs``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["Experience"]

# Per-token float fields the trainer fills in later; None until then.
OPTIONAL_TOKEN_FIELDS = (
    "old_logprobs",
    "reference_logprobs",
    "values",
    "token_rewards",
    "advantages",
    "returns",
    "is_weights",
)
_LIST_FIELDS = ("prompts", "completions", "row_fields")
# Per-row lists that a rollout may leave unset (None).
_OPTIONAL_LIST_FIELDS = ("episodes",)
# Fills used when ``cat`` widens a batch: a pad column is masked out everywhere.
_PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "response_mask": False}


@dataclass
class Experience:
    """Sampled sequences (N rows) and their per-token / per-sequence quantities.

    Attributes:
        input_ids: ``[N, T] long``; prompt left-padded to width P, then the response
            right-padded (pad columns hold the tokenizer's pad id, 0 after ``cat`` widening).
        attention_mask: ``[N, T] long``, 1 on real prompt and response tokens.
        response_mask: ``[N, T] bool``, True on generated tokens (the EOS included when emitted).
        prompt_width: P; column P is the first response token of every row.
        behaviour_logprobs: ``[N, T] float32``, log-prob of each sampled token under the
            sampling distribution (after temperature, top-k, top-p), 0 off the response mask.
        scores: ``[N] float32`` sequence rewards, NaN = not applicable (or not scored yet).
        group_index: ``[N] long`` global prompt index; all samples of a prompt share it.
        response_lengths: ``[N] long`` generated tokens per row (= response_mask.sum(1)).
        truncated: ``[N] bool``, the row hit the max_new_tokens cap without emitting EOS.
        prompts: N prompt texts; completions: N decoded responses (special tokens skipped);
        row_fields: N dicts, the prompt file's other columns (e.g. ``answer``).
        old_logprobs, reference_logprobs, values, token_rewards, advantages, returns,
        is_weights: ``[N, T] float32`` or None, filled by the trainer.
        episodes: N episodes (``rollout.chat_stream.Conversation``) the rows were made from, for
            an environment's rollout (its scores read them); None for single-turn rollouts. They
            travel with the batch so that one batch can be scored while the next is generated.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_width: int
    behaviour_logprobs: Tensor
    scores: Tensor
    group_index: Tensor
    response_lengths: Tensor
    truncated: Tensor
    prompts: list[str]
    completions: list[str]
    row_fields: list[dict[str, Any]]
    old_logprobs: Tensor | None = None
    reference_logprobs: Tensor | None = None
    values: Tensor | None = None
    token_rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    is_weights: Tensor | None = None
    episodes: list[Any] | None = None

    def __post_init__(self) -> None:
        n, t = self.input_ids.shape
        for name, value in self._tensors():
            expected = (n, t) if value.dim() == 2 else (n,)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"Experience.{name} has shape {tuple(value.shape)}, not {expected}"
                )
        for name in self._list_fields():
            if len(getattr(self, name)) != n:
                raise ValueError(f"Experience.{name} has {len(getattr(self, name))} rows, not {n}")
        if not 0 <= self.prompt_width <= t:
            raise ValueError(f"prompt_width {self.prompt_width} outside [0, {t}]")

    def _tensors(self) -> Iterator[tuple[str, Tensor]]:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                yield f.name, value

    def _list_fields(self) -> list[str]:
        optional = [name for name in _OPTIONAL_LIST_FIELDS if getattr(self, name) is not None]
        return [*_LIST_FIELDS, *optional]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        """T, the number of columns."""
        return self.input_ids.shape[1]

    def select(self, index: Tensor | Sequence[int]) -> Experience:
        """The rows ``index`` (any order, repeats allowed) of every per-row field."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = index.tolist()
        changes: dict[str, Any] = {
            name: value.index_select(0, index.to(value.device)) for name, value in self._tensors()
        }
        for name in self._list_fields():
            rows = getattr(self, name)
            changes[name] = [rows[i] for i in picked]
        return replace(self, **changes)

    def split(self, sequences_per_chunk: int) -> list[Experience]:
        """Consecutive chunks of ``sequences_per_chunk`` rows, in order (the last may be smaller)."""
        if sequences_per_chunk < 1:
            raise ValueError(f"sequences_per_chunk must be >= 1, got {sequences_per_chunk}")
        return [
            self.select(torch.arange(start, min(start + sequences_per_chunk, len(self))))
            for start in range(0, len(self), sequences_per_chunk)
        ]

    def minibatches(
        self, sequences_per_minibatch: int, generator: torch.Generator
    ) -> Iterator[Experience]:
        """A shuffle drawn from ``generator`` (a CPU generator), then consecutive chunks.

        Every row appears in exactly one mini-batch; the order depends only on the generator's
        state and N. The last mini-batch is smaller when N is not a multiple.
        """
        if sequences_per_minibatch < 1:
            raise ValueError(f"sequences_per_minibatch must be >= 1, got {sequences_per_minibatch}")
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), sequences_per_minibatch):
            yield self.select(order[start : start + sequences_per_minibatch])

    def to(self, device: torch.device | str) -> Experience:
        """A copy with every tensor on ``device``."""
        return replace(self, **{name: value.to(device) for name, value in self._tensors()})

    @classmethod
    def cat(cls, parts: Sequence[Experience]) -> Experience:
        """Rows of ``parts`` stacked in order.

        Parts with different widths are aligned on the prompt/response boundary: prompts are
        left-padded to the largest P, responses right-padded to the longest response; added
        columns are masked out (ids 0, masks 0, floats 0).
        """
        if not parts:
            raise ValueError("Experience.cat needs at least one part")
        width = max(p.prompt_width for p in parts)
        response = max(p.width - p.prompt_width for p in parts)
        changes: dict[str, Any] = {"prompt_width": width}
        first = parts[0]
        for f in fields(cls):
            name = f.name
            value = getattr(first, name)
            if name in _LIST_FIELDS:
                changes[name] = [row for p in parts for row in getattr(p, name)]
            elif name in _OPTIONAL_LIST_FIELDS:
                lists = [getattr(p, name) for p in parts]
                if any(rows is None for rows in lists) and not all(rows is None for rows in lists):
                    raise ValueError(f"Experience.cat: {name} is set in some parts only")
                changes[name] = None if lists[0] is None else [r for rows in lists for r in rows]
            elif isinstance(value, Tensor) or name in OPTIONAL_TOKEN_FIELDS:
                values = [getattr(p, name) for p in parts]
                if any(v is None for v in values):
                    if not all(v is None for v in values):
                        raise ValueError(f"Experience.cat: {name} is set in some parts only")
                    changes[name] = None
                    continue
                if values[0].dim() == 2:
                    pad = _PAD_VALUES.get(name, 0.0)
                    values = [
                        _pad_columns(
                            v, width - p.prompt_width, response - (p.width - p.prompt_width), pad
                        )
                        for v, p in zip(values, parts, strict=True)
                    ]
                changes[name] = torch.cat(values)
        return replace(first, **changes)


def _pad_columns(value: Tensor, left: int, right: int, pad: Any) -> Tensor:
    if left == 0 and right == 0:
        return value
    n = value.shape[0]
    before = value.new_full((n, left), pad)
    after = value.new_full((n, right), pad)
    return torch.cat([before, value, after], dim=1)
