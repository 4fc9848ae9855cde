"""The baseline-free REINFORCE estimator: advantages are the discounted returns-to-go."""

from __future__ import annotations

import torch

from alignkit.ops.advantages import get_advantage_estimator


def test_returns_estimator_gives_the_return_to_go_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    advantages, returns = get_advantage_estimator("returns")(
        token_rewards=rewards, mask=mask, gamma=0.5
    )
    # Row 0: G = [_, 1 + 0.5*0 + 0.25*2, 0 + 0.5*2, 2]; row 1: G = [_, 0.5*3, 3, _].
    expected = torch.tensor([[0.0, 1.5, 1.0, 2.0], [0.0, 1.5, 3.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected)
