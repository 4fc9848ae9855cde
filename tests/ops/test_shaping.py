"""DAPO's group filter and soft overlong punishment."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops import informative_groups, overlong_penalty
from alignkit.ops.advantages import zero_std_fraction


def test_informative_groups_are_those_with_two_different_finite_scores():
    nan = math.nan
    scores = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.5, 2.0, nan, 3.0, nan, nan, 1.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 9, 9, 4, 4, 5, 5])
    keep = informative_groups(scores, groups)
    # group 7: varied; 3: tied; 9: one finite score; 4: one finite; 5: one finite
    assert keep.tolist() == [True] * 3 + [False] * 8
    assert not informative_groups(torch.full((4,), nan), torch.zeros(4, dtype=torch.long)).any()
    # Consistent with the zero-std share that the trainer logs (all groups here have a finite
    # score): kept groups are exactly the non-tied ones.
    mixed = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 2.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    kept_groups = ids[informative_groups(mixed, ids)].unique().numel()
    assert kept_groups == round(3 * (1 - zero_std_fraction(mixed, ids).item()))


@pytest.mark.parametrize(("max_tokens", "buffer", "penalty"), [(100, 20, 1.0), (8, 3, 0.5)])
def test_overlong_penalty_is_dapos_piecewise_ramp(max_tokens, buffer, penalty):
    lengths = torch.arange(0, max_tokens + 3)
    got = overlong_penalty(lengths, max_tokens, buffer, penalty)
    for length, value in zip(lengths.tolist(), got.tolist(), strict=True):
        if length <= max_tokens - buffer:
            want = 0.0
        elif length <= max_tokens:
            want = penalty * ((max_tokens - buffer) - length) / buffer
        else:
            want = -penalty
        assert value == pytest.approx(want), length
    assert got[max_tokens].item() == pytest.approx(-penalty)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_tokens, max_tokens + 1)
