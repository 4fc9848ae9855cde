"""Policy/value losses and aggregation: hand values, seed-003 equivalence, clipping branches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.ops import losses as losses_module
from alignkit.ops.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    aggregate_loss,
    aggregation_units,
    get_policy_loss,
    policy_gradient_loss,
    ppo_policy_loss,
    register_policy_loss,
    value_loss,
)

LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
RAGGED = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # last row: no valid token


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("token-mean", (1 + 2 + 4) / 3),
        ("seq-mean-token-sum", ((1 + 2) + 4) / 2),
        ("seq-mean-token-mean", ((1 + 2) / 2 + 4) / 2),
    ],
)
def test_aggregate_modes_on_ragged_mask_by_hand(agg: str, expected: float) -> None:
    assert aggregate_loss(LOSS_MAT, RAGGED, agg).item() == pytest.approx(expected)
    assert aggregate_loss(LOSS_MAT, RAGGED.bool(), agg).item() == pytest.approx(expected)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_empty_mask_is_zero_with_finite_grad(agg: str) -> None:
    loss_mat = torch.randn(2, 4, requires_grad=True)
    loss = aggregate_loss(loss_mat, torch.zeros(2, 4), agg)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(loss_mat.grad, torch.zeros(2, 4))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregate_ignores_nan_and_inf_in_padding(agg: str) -> None:
    poisoned = LOSS_MAT.clone()
    poisoned[0, 2], poisoned[1, 1], poisoned[2, 0] = math.nan, math.inf, -math.inf
    assert aggregate_loss(poisoned, RAGGED, agg).item() == pytest.approx(
        aggregate_loss(LOSS_MAT, RAGGED, agg).item()
    )


@pytest.mark.parametrize(
    ("agg", "units"), [("token-mean", 3), ("seq-mean-token-sum", 2), ("seq-mean-token-mean", 2)]
)
def test_aggregation_units_count_tokens_or_non_empty_sequences(agg: str, units: int) -> None:
    assert aggregation_units(RAGGED, agg).item() == units
    expected = aggregate_loss(LOSS_MAT, RAGGED, agg)
    assert aggregate_loss(LOSS_MAT, RAGGED, agg, normaliser=units).item() == expected.item()


def test_dr_grpo_constant_normaliser_divides_sequence_sums_by_sequences_times_l() -> None:
    # Rows 0 and 1 have tokens (sums 3 and 4); L = 10: (3 + 4) / (2 * 10).
    agg = "seq-mean-token-sum-norm"
    assert aggregate_loss(LOSS_MAT, RAGGED, agg, max_tokens=10).item() == pytest.approx(0.35)
    assert aggregation_units(RAGGED, agg, max_tokens=10).item() == 20
    # Without L: the mask's width, 3 (verl's default loss_scale_factor).
    assert aggregate_loss(LOSS_MAT, RAGGED, agg).item() == pytest.approx(7 / 6)
    assert aggregation_units(RAGGED, agg).item() == 6
    # The step's count as the normaliser: L no longer read.
    assert aggregate_loss(
        LOSS_MAT, RAGGED, agg, normaliser=20, max_tokens=3
    ).item() == pytest.approx(0.35)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        aggregation_units(RAGGED, agg, max_tokens=0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_shares_with_the_step_normaliser_add_up_to_the_step_loss(agg: str) -> None:
    # Ragged rows split unevenly: 1 + 3 + 4 rows. With the step's global count as the
    # normaliser, the micro-batch losses sum to the whole batch's loss (and so do gradients).
    generator = torch.Generator().manual_seed(0)
    loss_mat = torch.randn(8, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([1, 6, 0, 2, 5, 3, 6, 1])
    mask = torch.arange(6) < lengths[:, None]
    whole = aggregate_loss(loss_mat, mask, agg)
    (whole_grad,) = torch.autograd.grad(whole, loss_mat)
    parts = [slice(0, 1), slice(1, 4), slice(4, 8)]
    normaliser = sum(aggregation_units(mask[p], agg) for p in parts)
    shares = [aggregate_loss(loss_mat[p], mask[p], agg, normaliser=normaliser) for p in parts]
    (split_grad,) = torch.autograd.grad(sum(shares), loss_mat)
    assert sum(shares).item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-12, atol=1e-15)
    # Brute force: the documented formula, row by row.
    rows = [loss_mat[b, : lengths[b]] for b in range(8)]
    if agg == "token-mean":
        brute = sum(r.sum() for r in rows) / lengths.sum()
    elif agg == "seq-mean-token-sum":
        brute = sum(r.sum() for r in rows if len(r)) / 7
    elif agg == "seq-mean-token-sum-norm":  # L = the mask's width, 6
        brute = sum(r.sum() for r in rows if len(r)) / (7 * 6)
    else:
        brute = sum(r.mean() for r in rows if len(r)) / 7
    assert whole.item() == pytest.approx(brute.item(), rel=1e-12)
    # Averaging the micro-batches' own means is a different objective on ragged rows.
    local_means = [aggregate_loss(loss_mat[p], mask[p], agg) for p in parts]
    assert abs(sum(local_means).item() / 3 - whole.item()) > 1e-3


def test_aggregate_rejects_a_non_positive_normaliser() -> None:
    with pytest.raises(ValueError, match="normaliser must be > 0, got 0"):
        aggregate_loss(LOSS_MAT, RAGGED, normaliser=0)


def test_aggregate_rejects_unknown_mode_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-sum, seq-mean-token-mean"):
        aggregate_loss(LOSS_MAT, RAGGED, "mean")


def test_aggregate_rejects_mask_of_other_shape() -> None:
    with pytest.raises(ValueError, match="mask has shape"):
        aggregate_loss(LOSS_MAT, RAGGED[:, :1], "token-mean")


def test_policy_gradient_loss_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    advantages = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # -A*logp on valid tokens: 1, 4, -0.5
    assert policy_gradient_loss(logp, advantages, mask).item() == pytest.approx(4.5 / 3)
    seq_sum = policy_gradient_loss(logp, advantages, mask, "seq-mean-token-sum")
    assert seq_sum.item() == pytest.approx((5.0 - 0.5) / 2)


def test_policy_gradient_loss_raises_logp_of_positive_advantage_tokens() -> None:
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    policy_gradient_loss(logp, torch.tensor([[2.0, -1.0]]), torch.ones(1, 2)).backward()
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]  # descent raises token 0, lowers token 1


def test_policy_gradient_seq_mean_token_mean_reproduces_seed_003() -> None:
    vocab, prompt_len, lengths = 11, 3, [5, 2, 4]
    rewards = torch.tensor([1.0, -0.1, 0.5])
    full_ids = torch.randint(vocab, (3, prompt_len + max(lengths)))
    logits = torch.randn(3, prompt_len + max(lengths), vocab)

    # Seed 003, one sequence at a time: logits[t-1] predict token t, mean over the response.
    seed_losses = []
    for i, length in enumerate(lengths):
        response_ids = full_ids[i : i + 1, prompt_len : prompt_len + length]
        response_logits = logits[i : i + 1, prompt_len - 1 : prompt_len + length - 1]
        log_probs = F.log_softmax(response_logits, dim=-1)
        selected = log_probs[0].gather(1, response_ids[0].unsqueeze(1)).squeeze()
        seed_losses.append(-selected.mean() * rewards[i])
    seed_loss = torch.stack(seed_losses).mean()

    all_logp = F.log_softmax(logits[:, prompt_len - 1 : -1], dim=-1)
    logp = all_logp.gather(-1, full_ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)
    mask = torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)
    loss = policy_gradient_loss(logp, rewards, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(loss, seed_loss)


def test_advantages_of_wrong_shape_are_rejected() -> None:
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_gradient_loss(torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


def _ppo_inputs(ratios: list[float], advantages: list[float]) -> tuple[torch.Tensor, ...]:
    old_logp = torch.full((1, len(ratios)), -2.0)
    logp = old_logp + torch.tensor([ratios]).log()
    return logp, old_logp, torch.tensor([advantages])


def test_ppo_clipfrac_and_loss_on_constructed_ratios() -> None:
    # A = 1: half the valid ratios are above 1 + 0.2; the padded token's ratio must not count.
    logp, old_logp, advantages = _ppo_inputs([1.0, 1.1, 1.5, 2.0, 50.0], [1.0] * 5)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, clip_ratio=0.2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(-(1.0 + 1.1 + 1.2 + 1.2) / 4)
    assert set(stats) == {"clipfrac", "approx_kl"}


def test_ppo_asymmetric_clip_uses_low_and_high_bounds() -> None:
    # A > 0 clips above 1 + eps_high only; A < 0 clips below 1 - eps_low only.
    logp, old_logp, advantages = _ppo_inputs([1.25, 1.3, 0.85, 0.75], [1.0, 1.0, -1.0, -1.0])
    loss, stats = ppo_policy_loss(
        logp, old_logp, advantages, torch.ones(1, 4), clip_ratio=0.2, clip_ratio_high=0.28
    )
    assert stats["clipfrac"].item() == pytest.approx(2 / 4)  # 1.3 and 0.75
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.85 + 0.8) / 4)


def test_ppo_clipped_tokens_get_no_gradient() -> None:
    logp, old_logp, advantages = _ppo_inputs([1.0, 2.0], [1.0, 1.0])
    logp.requires_grad_(True)
    loss, _ = ppo_policy_loss(logp, old_logp, advantages, torch.ones(1, 2))
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-0.5)  # -A * ratio / n_tokens
    assert logp.grad[0, 1].item() == 0.0


def test_ppo_dual_clip_caps_loss_for_negative_advantage() -> None:
    # A < 0 with a huge ratio: without dual clip the loss is -A * ratio; with it, -A * c.
    logp, old_logp, advantages = _ppo_inputs([math.exp(10.0), 1.0], [-1.0, -1.0])
    logp.requires_grad_(True)
    mask = torch.tensor([[1, 0]])
    plain, _ = ppo_policy_loss(logp, old_logp, advantages, mask)
    assert plain.item() == pytest.approx(math.exp(10.0), rel=1e-4)
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert stats["dual_clipfrac"].item() == 1.0
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0


def test_ppo_dual_clip_leaves_positive_advantages_alone() -> None:
    logp, old_logp, advantages = _ppo_inputs([math.exp(10.0), 0.5], [2.0, -1.0])
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, torch.ones(1, 2), dual_clip=3.0)
    assert loss.item() == pytest.approx((-2.0 * 1.2 + 0.8) / 2)
    assert stats["dual_clipfrac"].item() == 0.0


@pytest.mark.parametrize(
    "kwargs", [{"dual_clip": 1.0}, {"clip_ratio": 0.0}, {"clip_ratio": 1.0}, {"clip_ratio_high": 0}]
)
def test_ppo_rejects_invalid_clip_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be"):
        ppo_policy_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), **kwargs
        )


def test_ppo_log_ratio_is_clamped_so_the_loss_stays_finite() -> None:
    logp = torch.tensor([[0.0]], requires_grad=True)
    loss, stats = ppo_policy_loss(
        logp, torch.tensor([[-1000.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1)
    )
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)
    assert stats["approx_kl"].item() == -20.0
    assert torch.isfinite(logp.grad).all()


def test_ppo_approx_kl_estimates_kl_old_to_new_under_old_samples() -> None:
    old_probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    new_probs = torch.tensor([0.25, 0.25, 0.25, 0.25])
    tokens = torch.multinomial(old_probs, 200_000, replacement=True).view(1, -1)
    _, stats = ppo_policy_loss(
        new_probs.log()[tokens],
        old_probs.log()[tokens],
        torch.ones_like(tokens, dtype=torch.float),
        torch.ones_like(tokens),
    )
    kl_old_new = (old_probs * (old_probs / new_probs).log()).sum().item()
    kl_new_old = (new_probs * (new_probs / old_probs).log()).sum().item()
    assert stats["approx_kl"].item() == pytest.approx(kl_old_new, abs=0.01)
    assert abs(kl_old_new - kl_new_old) > 0.05  # the two directions are distinguishable here


def test_value_loss_by_hand_with_and_without_clip() -> None:
    values = torch.tensor([[1.0, 3.0, 3.0, 9.0]])
    old_values = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    plain, plain_stats = value_loss(values, old_values, returns, mask)
    assert plain.item() == pytest.approx((0.5 + 4.5 + 0.0) / 3)
    assert plain_stats["vf_clipfrac"].item() == 0.0
    # clip 0.5: token 2 moved from 1 to 3 toward R = 3, so the clipped error 0.5*1.5^2 wins.
    clipped, stats = value_loss(values, old_values, returns, mask, clip=0.5)
    assert clipped.item() == pytest.approx((0.5 + 4.5 + 1.125) / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


def test_value_clip_needs_old_values_and_positive_clip() -> None:
    values = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, None, values, torch.ones(1, 2), clip=0.2)
    with pytest.raises(ValueError, match="> 0"):
        value_loss(values, values, values, torch.ones(1, 2), clip=0.0)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_policy_loss_gradcheck(agg: str, dual_clip: float | None) -> None:
    logp = (torch.randn(3, 5, dtype=torch.float64) * 0.3 - 1).requires_grad_(True)
    old_logp = logp.detach() + torch.randn(3, 5, dtype=torch.float64) * 0.3
    advantages = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return ppo_policy_loss(x, old_logp, advantages, mask, dual_clip=dual_clip, agg=agg)[0]

    assert torch.autograd.gradcheck(loss_of, (logp,))


def test_value_loss_gradcheck() -> None:
    values = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    old_values = values.detach() + torch.randn(3, 5, dtype=torch.float64) * 0.4
    returns = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    assert torch.autograd.gradcheck(
        lambda v: value_loss(v, old_values, returns, mask, clip=0.2)[0], (values,)
    )


def test_bf16_inputs_give_float32_results_close_to_float32() -> None:
    logp = torch.randn(4, 6) * 0.5 - 1
    old_logp = logp + torch.randn(4, 6) * 0.2
    advantages = torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.3
    bf16 = [t.bfloat16() for t in (logp, old_logp, advantages)]
    rounded = [t.float() for t in bf16]  # the same values, already in float32

    loss, stats = ppo_policy_loss(*bf16, mask, dual_clip=3.0)
    ref_loss, ref_stats = ppo_policy_loss(*rounded, mask, dual_clip=3.0)
    assert loss.dtype == torch.float32 and stats["approx_kl"].dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(stats["approx_kl"], ref_stats["approx_kl"])

    pg = policy_gradient_loss(bf16[0], bf16[2], mask)
    assert pg.dtype == torch.float32
    torch.testing.assert_close(pg, policy_gradient_loss(rounded[0], rounded[2], mask))
    vf, _ = value_loss(bf16[0], bf16[1], bf16[2], mask, clip=0.2)
    assert vf.dtype == torch.float32
    torch.testing.assert_close(vf, value_loss(*rounded, mask, clip=0.2)[0])
    assert aggregate_loss(bf16[0], mask).dtype == torch.float32


# --- policy-loss registry, importance weights, the step normaliser ---------------------------


def _rollout(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(3, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    old_logp = logp.detach() + 0.3 * torch.randn(3, 5, generator=generator, dtype=torch.float64)
    advantages = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    weights = torch.rand(3, 5, generator=generator, dtype=torch.float64) * 2
    return logp, old_logp, advantages, mask, weights


def test_registered_policy_losses_are_the_direct_functions():
    assert {"ppo_clip", "policy_gradient"} <= set(POLICY_LOSSES)
    logp, old_logp, advantages, mask, _ = _rollout()
    ppo, stats = get_policy_loss("ppo_clip")(
        logp, old_logp, advantages, mask, clip_ratio=0.1, agg="seq-mean-token-mean"
    )
    direct, direct_stats = ppo_policy_loss(
        logp, old_logp, advantages, mask, clip_ratio=0.1, agg="seq-mean-token-mean"
    )
    assert ppo.item() == direct.item() and stats.keys() == direct_stats.keys()
    pg, pg_stats = get_policy_loss("pg")(logp, old_logp, advantages, mask)
    assert pg.item() == policy_gradient_loss(logp, advantages, mask).item()
    valid = mask.bool()
    assert pg_stats["approx_kl"].item() == pytest.approx((old_logp - logp)[valid].mean().item())


@pytest.mark.parametrize("name", ["ppo_clip", "policy_gradient"])
def test_weights_multiply_each_token_loss_before_aggregation(name):
    logp, old_logp, advantages, mask, weights = _rollout(1)
    loss, _ = get_policy_loss(name)(
        logp, old_logp, advantages, mask, weights=weights, agg="seq-mean-token-sum"
    )
    # Brute force, token by token: PPO's per-token term, or -A logp, times w.
    ratio = (logp - old_logp).exp()
    total = 0.0
    for b in range(3):
        sequence = 0.0
        for t in range(5):
            if mask[b, t]:
                a, r = advantages[b, t], ratio[b, t]
                if name == "ppo_clip":
                    term = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
                else:
                    term = -a * logp[b, t]
                sequence = sequence + weights[b, t] * term
        total = total + sequence
    torch.testing.assert_close(loss, total / 3)
    # The weights are constants: d loss / d logp carries w, never d w.
    (grad,) = torch.autograd.grad(loss, logp)
    unweighted, _ = get_policy_loss(name)(
        logp, old_logp, advantages, mask, agg="seq-mean-token-sum"
    )
    (grad_unweighted,) = torch.autograd.grad(unweighted, logp)
    torch.testing.assert_close(grad, grad_unweighted * weights * mask)
    with pytest.raises(ValueError, match="weights has shape"):
        get_policy_loss(name)(logp, old_logp, advantages, mask, weights=weights[:, :2])


@pytest.mark.parametrize("name", ["ppo_clip", "policy_gradient"])
def test_policy_losses_forward_the_step_normaliser_to_aggregate_loss(monkeypatch, name):
    seen = []

    def recording_aggregate(loss_mat, mask, agg="token-mean", normaliser=None):
        seen.append((agg, normaliser))
        return loss_mat.sum()

    monkeypatch.setattr(losses_module, "aggregate_loss", recording_aggregate)
    logp, old_logp, advantages, mask, _ = _rollout()
    get_policy_loss(name)(logp, old_logp, advantages, mask, agg="token-mean", normaliser=40.0)
    assert ("token-mean", 40.0) in seen


def test_policy_loss_registry_errors_and_outside_registration():
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo_clp'.*Did you mean 'ppo_clip'"):
        get_policy_loss("ppo_clp")
    with pytest.raises(ValueError, match="policy loss name 'ppo_clip' is already registered"):
        register_policy_loss("ppo_clip")(ppo_policy_loss)

    @register_policy_loss("test-sign-only")
    def sign_only(
        logp, old_logp, advantages, mask, *, weights=None, agg="token-mean", normaliser=None
    ):
        return aggregate_loss(-advantages.sign() * logp, mask, agg), {}

    try:
        logp, old_logp, advantages, mask, _ = _rollout(2)
        loss, _ = get_policy_loss("test-sign-only")(logp, old_logp, advantages, mask)
        assert loss.item() == pytest.approx((-advantages.sign() * logp)[mask.bool()].mean().item())
    finally:
        POLICY_LOSSES.unregister("test-sign-only")
