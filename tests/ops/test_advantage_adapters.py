"""The advantage registry's adapters give the direct functions' values (not only shapes), with
gamma != 1 and lambda != gamma so that a swapped or dropped argument shows; and registering a
taken name is an error."""

from __future__ import annotations

import pytest
import torch

from alignkit.ops.advantages import (
    discounted_returns,
    gae,
    get_advantage_estimator,
    grpo_advantages,
    register_advantage_estimator,
)

GAMMA, LAM = 0.9, 0.7


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 5, generator=generator)
    values = torch.randn(4, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return rewards, values, mask, torch.tensor([0, 0, 1, 1])


def estimate(name, batch):
    rewards, values, mask, groups = batch
    return get_advantage_estimator(name)(
        rewards, mask, values=values, group_index=groups, gamma=GAMMA, lam=LAM
    )


def returns_by_loop(rewards, mask, gamma):
    """G_t = r_t + gamma * G_{t+1} over each row's valid tokens, written as a plain loop."""
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        carry = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                carry = float(rewards[b, t]) + gamma * carry
                out[b, t] = carry
    return out


def test_gae_adapter_passes_gamma_and_lambda_in_order(batch):
    rewards, values, mask, _ = batch
    advantages, returns = estimate("gae", batch)
    expected_adv, expected_ret = gae(rewards, values, mask, GAMMA, LAM)
    torch.testing.assert_close(advantages, expected_adv)
    torch.testing.assert_close(returns, expected_ret)
    swapped, _ = gae(rewards, values, mask, LAM, GAMMA)
    assert (swapped - expected_adv).abs().max() > 0.05


def test_dr_grpo_adapter_does_not_divide_by_the_std(batch):
    rewards, _, mask, groups = batch
    advantages, _ = estimate("dr_grpo", batch)
    scores = (rewards * mask).sum(1)
    centred = scores - torch.stack([scores[groups == g].mean() for g in groups])
    torch.testing.assert_close(advantages, centred[:, None] * mask)
    scaled = grpo_advantages(scores, groups, scale="group")
    assert (scaled - centred).abs().max() > 0.05


def test_reinforce_adapters_use_discounted_returns(batch):
    rewards, _, mask, _ = batch
    by_loop = returns_by_loop(rewards, mask, GAMMA)
    torch.testing.assert_close(discounted_returns(rewards, mask, GAMMA), by_loop)
    valid = mask.bool()
    for name in ("reinforce", "reinforce_pp"):
        advantages, returns = estimate(name, batch)
        torch.testing.assert_close(returns, by_loop)
        # Both standardise the returns over all valid tokens of the batch (unbiased std).
        assert advantages[valid].mean().abs() < 1e-5
        assert advantages[valid].std(unbiased=True) == pytest.approx(1.0, rel=1e-4)
        assert (advantages[~valid] == 0).all()


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(ValueError, match="'gae' is already registered"):
        register_advantage_estimator("gae")(lambda *args, **kwargs: None)
