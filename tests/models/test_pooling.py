"""Pooling reads exactly the real tokens, under right and left padding."""

from __future__ import annotations

import pytest
import torch

from alignkit.models.pooling import AttentionPooling, first_token_index, last_token_index, pool

# Two sequences of lengths 3 and 5, padded to 6: by hand, both sides.
RIGHT = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
LEFT = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


def _positional_hidden(mask: torch.Tensor, hidden_size: int = 3) -> torch.Tensor:
    """hidden[b, t, :] = t + 1 at real tokens, NaN at pads (pads must never be read)."""
    positions = torch.arange(1, mask.shape[1] + 1, dtype=torch.float32)
    hidden = positions[None, :, None].expand(*mask.shape, hidden_size).clone()
    return hidden.masked_fill(~mask.bool()[..., None], float("nan"))


def test_last_and_first_token_indices_under_both_paddings() -> None:
    assert last_token_index(RIGHT).tolist() == [2, 4]
    assert last_token_index(LEFT).tolist() == [5, 5]
    assert first_token_index(RIGHT).tolist() == [0, 0]
    assert first_token_index(LEFT).tolist() == [3, 1]


@pytest.mark.parametrize(
    ("pooling", "right_expected", "left_expected"),
    [
        ("last", [3.0, 5.0], [6.0, 6.0]),
        ("cls", [1.0, 1.0], [4.0, 2.0]),
        ("mean", [2.0, 3.0], [5.0, 4.0]),
        ("max", [3.0, 5.0], [6.0, 6.0]),
    ],
)
def test_pooling_values_by_hand(pooling: str, right_expected: list, left_expected: list) -> None:
    for mask, expected in ((RIGHT, right_expected), (LEFT, left_expected)):
        pooled = pool(_positional_hidden(mask), mask, pooling)
        assert pooled.shape == (2, 3)
        assert torch.equal(pooled, torch.tensor(expected)[:, None].expand(2, 3)), mask


def test_max_pooling_ignores_larger_values_at_pads() -> None:
    hidden = torch.tensor([[[1.0], [2.0], [99.0]]])
    assert pool(hidden, torch.tensor([[1, 1, 0]]), "max").item() == 2.0


def test_attention_pooling_is_a_convex_combination_of_real_tokens_only() -> None:
    module = AttentionPooling(hidden_size=8)
    hidden = torch.randn(2, 6, 8)
    pooled = pool(hidden, RIGHT, "attention", module)
    assert pooled.shape == (2, 8) and torch.isfinite(pooled).all()
    # Replacing the pad positions (even with NaN) changes nothing.
    poisoned = hidden.masked_fill(~RIGHT.bool()[..., None], float("nan"))
    assert torch.equal(pool(poisoned, RIGHT, "attention", module), pooled)
    # With identical real tokens, any convex combination returns that token.
    same = torch.randn(8).expand(2, 6, 8).clone()
    assert torch.allclose(pool(same, LEFT, "attention", module), same[:, 0], atol=1e-6)


def test_unknown_pooling_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'median'"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "median")
