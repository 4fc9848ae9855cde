"""alignkit's policy losses and group estimators against verl 0.9.1's ``core_algos`` on
identical tensors (loaded from the wheel by conftest.verl; skipped without it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peers import verl_actor_config

from alignkit.ops import (
    cispo_policy_loss,
    get_advantage_estimator,
    gspo_token_policy_loss,
    ppo_policy_loss,
    sapo_policy_loss,
)
from alignkit.ops.advantages import terminal_rewards

ATOL = 1e-12
#: verl's seq-mean-token-mean divides each sequence's sum by (token count + 1e-8).
RTOL = 1e-7


def tensors(seed: int = 0, spread: float = 0.3, token_advantages: bool = False):
    g = torch.Generator().manual_seed(seed)
    n, width = 6, 8
    mask = torch.zeros(n, width, dtype=torch.bool)
    for row, length in enumerate([8, 3, 5, 1, 6, 2]):
        mask[row, :length] = True
    old = torch.where(mask, -torch.rand(n, width, generator=g, dtype=torch.float64) * 2, 0.0)
    noise = spread * torch.randn(n, width, generator=g, dtype=torch.float64)
    logp = old + torch.where(mask, noise, 0.0)
    shape = (n, width) if token_advantages else (n, 1)
    advantages = torch.randn(shape, generator=g, dtype=torch.float64).expand(n, width)
    return logp, old, torch.where(mask, advantages, 0.0), mask


def compare(ours_fn, theirs_fn, logp):
    mine = logp.clone().requires_grad_(True)
    peer = logp.clone().requires_grad_(True)
    ours, theirs = ours_fn(mine), theirs_fn(peer)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(mine.grad, peer.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("spread", [0.02, 0.3])
def test_gspo_token_is_verls_gspo(verl, agg, spread):
    logp, old, advantages, mask = tensors(spread=spread, token_advantages=True)
    config = verl_actor_config(clip_ratio_low=0.03, clip_ratio_high=0.04)
    compare(
        lambda lp: gspo_token_policy_loss(
            lp, old, advantages, mask, clip_ratio=0.03, clip_ratio_high=0.04, agg=agg
        )[0],
        lambda lp: verl.compute_policy_loss_gspo(old, lp, advantages, mask.double(), agg, config)[
            0
        ],
        logp,
    )


def test_cispo_is_verls_two_sided_form(verl):
    logp, old, advantages, mask = tensors(spread=1.0, token_advantages=True)
    config = verl_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    compare(
        lambda lp: cispo_policy_loss(
            lp, old, advantages, mask, clip_ratio=0.2, clip_ratio_high=0.28
        )[0],
        lambda lp: verl.compute_policy_loss_cispo(
            old, lp, advantages, mask.double(), "token-mean", config
        )[0],
        logp,
    )


def test_sapo_is_verls(verl):
    logp, old, advantages, mask = tensors(spread=0.6, token_advantages=True)
    config = verl_actor_config(tau_pos=1.0, tau_neg=1.05)
    compare(
        lambda lp: sapo_policy_loss(lp, old, advantages, mask)[0],
        lambda lp: verl.compute_policy_loss_sapo(
            old,
            lp,
            advantages,
            mask.double(),
            "token-mean",
            config,  # verl forces seq-mean
        )[0],
        logp,
    )


@pytest.mark.parametrize("option", ["dual_clip", "delta"])
def test_dual_and_two_sided_clip_are_verls_dual_clip(verl, option):
    logp, old, advantages, mask = tensors(spread=1.5, token_advantages=True)
    config = verl_actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    compare(
        lambda lp: ppo_policy_loss(
            lp, old, advantages, mask, clip_ratio=0.2, clip_ratio_high=0.28, **{option: 3.0}
        )[0],
        lambda lp: verl.compute_policy_loss_vanilla(
            old, lp, advantages, mask.double(), "token-mean", config
        )[0],
        logp,
    )


SCORES = torch.tensor([1.0, 0.0, 0.5, 0.25, 3.0, 1.0, 2.0, 0.5, 4.0, 4.0, 4.0, 4.0])
GROUPS = torch.arange(3).repeat_interleave(4)  # no single-sample group: verl scores those raw


@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_grpo_scaling_is_verls_norm_adv_by_std_in_grpo(verl, scale, eps):
    mask = torch.ones(12, 5, dtype=torch.bool)
    rewards = terminal_rewards(SCORES, mask)
    ours, _ = get_advantage_estimator("grpo")(
        token_rewards=rewards, mask=mask, group_index=GROUPS, scale_rewards=scale, std_eps=eps
    )
    theirs, _ = verl.compute_grpo_outcome_advantage(
        rewards.clone(),
        mask.float(),
        np.array(GROUPS),
        epsilon=eps,
        norm_adv_by_std_in_grpo=scale == "group",
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_rloo_is_verls(verl):
    mask = torch.ones(12, 5, dtype=torch.bool)
    rewards = terminal_rewards(SCORES, mask)
    ours, _ = get_advantage_estimator("rloo")(token_rewards=rewards, mask=mask, group_index=GROUPS)
    theirs, _ = verl.compute_rloo_outcome_advantage(rewards.clone(), mask.float(), np.array(GROUPS))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
