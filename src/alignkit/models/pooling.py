"""Pool a sequence of hidden states ``[B, T, H]`` into one vector per sequence ``[B, H]``.

Seed 002 §4.3.2 lists ``last``, ``mean``, ``max``, ``cls`` and learned ``attention`` pooling. Every
pooling here reads only the positions where ``attention_mask`` is 1, so pad tokens never
influence the result, under right *or* left padding. (The seed's ``last`` reads position ``-1``,
which is a pad token under right padding; ``cls`` reads position 0, a pad under left padding;
see seeds/NOTES.md.) Hidden states at pad positions are never multiplied by zero, only replaced
(``masked_fill``/``where``), so a NaN there cannot leak into the result.

Every row must have at least one real token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLINGS = ("last", "mean", "max", "cls", "attention")


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last non-pad token of each row, ``[B]`` (any padding side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1)


def first_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the first non-pad token of each row, ``[B]`` (any padding side)."""
    length = attention_mask.shape[1]
    positions = torch.arange(length, device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, length).amin(dim=1)


def _gather_rows(hidden: Tensor, index: Tensor) -> Tensor:
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class AttentionPooling(nn.Module):
    """Learned attention pooling (seed 002 §4.3.2's ``AttentionPoolingHead`` without its output
    projection, which here is the reward head): ``softmax_t(w2 . tanh(W1 h_t))``-weighted mean of
    the hidden states, pad positions excluded."""

    def __init__(self, hidden_size: int):
        super().__init__()
        inner = max(hidden_size // 4, 1)
        self.score = nn.Sequential(nn.Linear(hidden_size, inner), nn.Tanh(), nn.Linear(inner, 1))

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.bool()
        scores = self.score(hidden).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).to(hidden.dtype)
        return torch.einsum("bt,bth->bh", weights, hidden.masked_fill(~mask[..., None], 0.0))


def pool(
    hidden: Tensor,
    attention_mask: Tensor,
    pooling: str,
    attention: AttentionPooling | None = None,
) -> Tensor:
    """Pool ``hidden [B, T, H]`` over the real tokens of ``attention_mask [B, T]`` into ``[B, H]``.

    ``attention`` is the learned module, required for ``pooling="attention"``.
    """
    mask = attention_mask.bool()
    if pooling == "last":
        return _gather_rows(hidden, last_token_index(mask))
    if pooling == "cls":
        return _gather_rows(hidden, first_token_index(mask))
    if pooling == "mean":
        total = hidden.masked_fill(~mask[..., None], 0.0).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    if pooling == "max":
        lowest = torch.finfo(hidden.dtype).min
        return hidden.masked_fill(~mask[..., None], lowest).amax(dim=1)
    if pooling == "attention":
        if attention is None:
            raise ValueError("attention pooling needs its AttentionPooling module")
        return attention(hidden, mask)
    raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
