"""GSPO, GSPO-token, CISPO, SAPO and PPO's two-sided clip against brute-force loops and closed
forms (values and gradients). The peer libraries' code is in test_peer_trl.py/test_peer_verl.py."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops import (
    AGG_MODES,
    cispo_policy_loss,
    get_policy_loss,
    gspo_policy_loss,
    gspo_token_policy_loss,
    ppo_policy_loss,
    sapo_policy_loss,
    sequence_log_ratio,
)


def batch(seed: int = 0, n: int = 5, width: int = 7, spread: float = 0.3):
    """Ragged masks (one row empty), log-probs near the old ones, per-sequence advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 0, 5, 1][:n]
    mask = torch.zeros(n, width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, width - 7 : width - 7 + length] = True
    old = -torch.rand(n, width, generator=g, dtype=torch.float64) * 2 - 0.1
    logp = old + spread * torch.randn(n, width, generator=g, dtype=torch.float64)
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    return logp.requires_grad_(True), old, advantages, mask


def grad_of(loss: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, logp)
    return grad


# --------------------------------------------------------------------------------------
# GSPO


def brute_gspo(logp, old, advantages, mask, eps_low, eps_high):
    """The paper's objective, one sequence at a time: mean_i max(-A s, -A clip(s))."""
    losses = []
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not tokens:
            continue
        mean_log = sum(logp[i, t] - old[i, t] for t in tokens) / len(tokens)
        s = torch.exp(mean_log)
        a = advantages[i]
        losses.append(torch.maximum(-a * s, -a * torch.clamp(s, 1 - eps_low, 1 + eps_high)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("spread", [0.01, 0.3])  # inside and outside the clip range
def test_gspo_is_the_papers_sequence_objective_in_value_and_gradient(spread):
    logp, old, advantages, mask = batch(spread=spread)
    loss, stats = gspo_policy_loss(logp, old, advantages, mask, clip_ratio=0.05)
    want = brute_gspo(logp, old, advantages, mask, 0.05, 4e-4)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad_of(loss, logp), grad_of(want, logp))
    # The ratio is the geometric mean of the token ratios.
    log_s = sequence_log_ratio(logp, old, mask)
    row = 1
    ratios = (logp[row] - old[row]).exp()[mask[row]]
    assert log_s[row].exp().item() == pytest.approx(ratios.prod().item() ** (1 / 3))
    assert log_s[2].item() == 0.0  # the empty row
    assert 0 <= stats["clipfrac"].item() <= 1


def test_gspo_clips_whole_sequences():
    # A sequence whose geometric-mean ratio left the range gets no gradient at any token, even
    # where a token's own ratio is 1.
    logp, old, advantages, mask = batch(spread=0.0)
    with torch.no_grad():
        logp[0, 0] += 0.5  # sequence 0: s = exp(0.5 / 7) > 1 + eps_high
    advantages = torch.ones_like(advantages)
    loss, _ = gspo_policy_loss(logp, old, advantages, mask)
    grad = grad_of(loss, logp)
    assert grad[0].abs().sum() == 0
    assert grad[1][mask[1]].abs().min() > 0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_gspo_and_gspo_token_agree_for_per_sequence_advantages(agg):
    logp, old, advantages, mask = batch(spread=0.02)
    per_token = advantages[:, None].expand_as(logp)
    seq, _ = gspo_policy_loss(logp, old, per_token, mask, clip_ratio=0.01, agg=agg)
    tok, _ = gspo_token_policy_loss(logp, old, advantages, mask, clip_ratio=0.01, agg=agg)
    torch.testing.assert_close(seq, tok)
    torch.testing.assert_close(grad_of(seq, logp), grad_of(tok, logp))


def test_gspo_token_takes_token_advantages_and_gspo_refuses_them():
    logp, old, _, mask = batch()
    advantages = torch.randn(logp.shape, dtype=torch.float64)
    loss, _ = gspo_token_policy_loss(
        logp, old, advantages, mask, clip_ratio=0.9, clip_ratio_high=9.0
    )
    # Inside the range: value s_i * (-A_it), gradient -A_it * s_i per token, over tokens of
    # each sequence and then over sequences (seq-mean-token-mean, the default).
    s = sequence_log_ratio(logp, old, mask).exp().detach()
    counts = mask.sum(-1).clamp_min(1)
    sequences = (mask.sum(-1) > 0).sum()
    want_grad = torch.where(mask, -advantages * s[:, None] / counts[:, None], 0.0) / sequences
    torch.testing.assert_close(grad_of(loss, logp), want_grad)
    with pytest.raises(ValueError, match="gspo_token"):
        gspo_policy_loss(logp, old, advantages, mask)


# --------------------------------------------------------------------------------------
# CISPO


def test_cispo_weights_are_clipped_constants_and_no_token_loses_its_gradient():
    logp, old, advantages, mask = batch(spread=1.0)
    loss, stats = cispo_policy_loss(logp, old, advantages, mask, clip_ratio_high=0.5)
    ratio = (logp - old).exp().detach()
    weight = ratio.clamp(max=1.5)
    tokens = mask.sum()
    want = torch.where(mask, -weight * advantages[:, None] * logp, 0.0).sum() / tokens
    torch.testing.assert_close(loss, want)
    grad = grad_of(loss, logp)
    torch.testing.assert_close(grad, torch.where(mask, -weight * advantages[:, None], 0.0) / tokens)
    assert grad[mask].abs().min() > 0  # clipped tokens keep a (bounded) gradient
    assert stats["clipfrac"].item() == pytest.approx((ratio > 1.5)[mask].float().mean().item())
    # With a lower bound, small ratios are raised to it.
    low, _ = cispo_policy_loss(logp, old, advantages, mask, clip_ratio=0.5, clip_ratio_high=0.5)
    lower = ratio.clamp(0.5, 1.5)
    want_low = torch.where(mask, -lower * advantages[:, None] * logp, 0.0).sum() / tokens
    torch.testing.assert_close(low, want_low)


# --------------------------------------------------------------------------------------
# SAPO


def test_sapo_gate_value_and_gradient_in_closed_form():
    logp, old, advantages, mask = batch(spread=0.5)
    loss, stats = sapo_policy_loss(logp, old, advantages, mask, agg="token-mean")
    r = (logp - old).exp().detach()
    a = advantages[:, None].expand_as(r)
    tau = torch.where(a > 0, 1.0, 1.05)
    sig = torch.sigmoid(tau * (r - 1))
    tokens = mask.sum()
    want = torch.where(mask, -sig * 4 / tau * a, 0.0).sum() / tokens
    torch.testing.assert_close(loss, want)
    # d/dlogp f(r) = f'(r) r = 4 sig (1 - sig) r: at r = 1 that is 1, the policy gradient.
    want_grad = torch.where(mask, -4 * sig * (1 - sig) * r * a, 0.0) / tokens
    torch.testing.assert_close(grad_of(loss, logp), want_grad)
    on_policy = old.clone().requires_grad_(True)
    loss_1, stats_1 = sapo_policy_loss(on_policy, old, advantages, mask, agg="token-mean")
    pg = torch.where(mask, -a, 0.0) / tokens
    torch.testing.assert_close(grad_of(loss_1, on_policy), pg)
    assert stats_1["gate_mean"].item() == pytest.approx(1.0)
    assert stats["gate_mean"].item() != pytest.approx(1.0)


def test_sapo_defaults_to_the_per_sequence_mean():
    logp, old, advantages, mask = batch()
    default, _ = sapo_policy_loss(logp, old, advantages, mask)
    explicit, _ = sapo_policy_loss(logp, old, advantages, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(default, explicit)


# --------------------------------------------------------------------------------------
# PPO's two-sided clip


def test_two_sided_clip_equals_dual_clip_with_the_same_bound():
    logp, old, advantages, mask = batch(spread=1.5)  # ratios well beyond 3 occur
    advantages = advantages.clone()
    advantages[0] = -abs(advantages[0])
    two, stats = ppo_policy_loss(logp, old, advantages, mask, delta=3.0)
    dual, dual_stats = ppo_policy_loss(logp, old, advantages, mask, dual_clip=3.0)
    torch.testing.assert_close(two, dual)
    torch.testing.assert_close(grad_of(two, logp), grad_of(dual, logp))
    assert stats["dual_clipfrac"].item() > 0
    assert stats["dual_clipfrac"].item() == pytest.approx(dual_stats["dual_clipfrac"].item())
    # Brute force of TRL's formula: -min(min(r, delta) A, clip(r) A), token by token.
    r = (logp - old).exp().detach()
    total = 0.0
    for i in range(r.shape[0]):
        for t in range(r.shape[1]):
            if mask[i, t]:
                a = advantages[i].item()
                ri = r[i, t].item()
                total += -min(min(ri, 3.0) * a, min(max(ri, 0.8), 1.2) * a)
    assert two.item() == pytest.approx(total / mask.sum().item())


def test_two_sided_clip_settings_are_checked():
    logp, old, advantages, mask = batch()
    with pytest.raises(ValueError, match="delta must be > 1"):
        ppo_policy_loss(logp, old, advantages, mask, delta=1.1)
    with pytest.raises(ValueError, match="give one"):
        ppo_policy_loss(logp, old, advantages, mask, delta=3.0, dual_clip=3.0)


# --------------------------------------------------------------------------------------
# Shared behaviour


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "cispo", "sapo"])
def test_each_variant_is_registered_exact_under_micro_batching_and_ignores_padding(name):
    loss_fn = get_policy_loss(name)
    logp, old, advantages, mask = batch(seed=3, spread=0.02)
    with torch.no_grad():  # garbage at padded positions must not leak
        logp[~mask] = math.nan
        old[~mask] = math.inf
    whole, _ = loss_fn(logp, old, advantages, mask, agg="token-mean")
    assert torch.isfinite(whole)
    # Two micro-batches with the step's normaliser add up to the whole step.
    tokens = mask.sum()
    parts = [
        loss_fn(
            logp[rows], old[rows], advantages[rows], mask[rows], agg="token-mean", normaliser=tokens
        )[0]
        for rows in (slice(0, 2), slice(2, 5))
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole)
    grad = grad_of(whole, logp)
    assert torch.isfinite(grad).all() and grad[~mask].abs().sum() == 0
    # Per-token weights multiply each token's loss.
    weights = torch.where(mask, 0.0, 1.0).double()
    zero, _ = loss_fn(logp, old, advantages, mask, weights=weights)
    assert zero.item() == 0.0
