"""DPO family, reward-model losses and Plackett-Luce: hand values, minima, gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.errors import ConfigError
from alignkit.ops import losses
from alignkit.ops.preference import (
    DPO_LOSSES,
    REWARD_LOSSES,
    dpo_loss,
    is_reference_free,
    length_normalized_nll,
    multitask_reward_loss,
    orient_pairs,
    plackett_luce_loss,
    reference_free_dpo_loss,
    register_dpo_loss,
    register_reward_loss,
    reward_model_loss,
)


def _logps_with_margin(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Policy/reference log-probs whose log-ratio difference is exactly ``h``."""
    zeros = torch.zeros_like(h)
    return h.clone(), zeros.clone(), zeros.clone(), zeros.clone()


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_losses_module_re_exports_the_preference_losses() -> None:
    assert losses.dpo_loss is dpo_loss
    assert losses.reward_model_loss is reward_model_loss
    assert losses.plackett_luce_loss is plackett_luce_loss


def test_dpo_sigmoid_is_log2_at_equal_log_ratios_and_pushes_chosen_up() -> None:
    policy_chosen = torch.tensor([-5.0, -9.0], requires_grad=True)
    policy_rejected = torch.tensor([-7.0, -3.0], requires_grad=True)
    # Reference log-ratios equal to the policy's: h = 0.
    ref_chosen, ref_rejected = torch.tensor([-4.0, -8.0]), torch.tensor([-6.0, -2.0])
    losses_, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1
    )
    torch.testing.assert_close(losses_, torch.full((2,), math.log(2.0)))
    torch.testing.assert_close(chosen_rewards, torch.full((2,), -0.1))
    torch.testing.assert_close(rejected_rewards, torch.full((2,), -0.1))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses_.sum().backward()
    # d/dz -log s(z) = -s(-z) = -1/2 at z = 0, times beta: descent raises chosen, lowers rejected.
    torch.testing.assert_close(policy_chosen.grad, torch.full((2,), -0.05))
    torch.testing.assert_close(policy_rejected.grad, torch.full((2,), 0.05))


def test_dpo_sigmoid_and_cdpo_by_hand() -> None:
    h = torch.tensor([2.0])
    plain = dpo_loss(*_logps_with_margin(h), beta=0.5)[0]
    assert plain.item() == pytest.approx(-_log_sigmoid(1.0))
    smoothed = dpo_loss(*_logps_with_margin(h), beta=0.5, label_smoothing=0.1)[0]
    assert smoothed.item() == pytest.approx(-0.9 * _log_sigmoid(1.0) - 0.1 * _log_sigmoid(-1.0))


def test_ipo_minimum_is_at_half_inverse_beta_not_inverse_beta() -> None:
    beta = 0.25
    h = torch.linspace(0.0, 6.0, 601, dtype=torch.float64)  # step 0.01; 1/(2b) = 2, 1/b = 4
    ipo = dpo_loss(*_logps_with_margin(h), beta=beta, kind="ipo")[0]
    assert h[ipo.argmin()].item() == pytest.approx(1 / (2 * beta))
    assert ipo.min().item() == pytest.approx(0.0, abs=1e-12)
    at_inverse_beta = dpo_loss(*_logps_with_margin(torch.tensor([4.0])), beta=beta, kind="ipo")
    assert at_inverse_beta[0].item() == pytest.approx(4.0)  # (4 - 2)^2


def test_hinge_is_zero_beyond_the_margin_with_zero_gradient() -> None:
    beta = 0.5  # margin 1/beta = 2 nats
    h = torch.tensor([2.5, 2.0, 1.0], requires_grad=True)
    zeros = torch.zeros(3)
    losses_ = dpo_loss(h, zeros, zeros, zeros, beta=beta, kind="hinge")[0]
    torch.testing.assert_close(losses_, torch.tensor([0.0, 0.0, 0.5]), rtol=0, atol=1e-7)
    losses_.sum().backward()
    assert h.grad[0].item() == 0.0 and h.grad[2].item() == pytest.approx(-beta)


def test_robust_reduces_to_sigmoid_at_zero_smoothing() -> None:
    inputs = [torch.randn(8) for _ in range(4)]
    robust = dpo_loss(*inputs, beta=0.3, kind="robust")[0]
    torch.testing.assert_close(robust, dpo_loss(*inputs, beta=0.3, kind="sigmoid")[0])


def test_robust_by_hand_and_unbiased_under_label_flips() -> None:
    eps, beta = 0.2, 1.0
    h = torch.tensor([1.5, -0.7, 3.0], dtype=torch.float64)
    robust = dpo_loss(*_logps_with_margin(h), beta=beta, kind="robust", label_smoothing=eps)[0]
    expected = (0.8 * -_log_sigmoid(1.5) + 0.2 * _log_sigmoid(-1.5)) / 0.6
    assert robust[0].item() == pytest.approx(expected)
    flipped = dpo_loss(*_logps_with_margin(-h), beta=beta, kind="robust", label_smoothing=eps)[0]
    # Chowdhury et al.: in expectation over flipped labels the robust loss is the clean loss.
    torch.testing.assert_close((1 - eps) * robust + eps * flipped, -F.logsigmoid(beta * h))


@pytest.mark.parametrize(
    ("kind", "label_smoothing"),
    [("ipo", 0.1), ("hinge", 0.1), ("robust", 0.5), ("sigmoid", 0.6), ("sigmoid", -0.1)],
)
def test_dpo_rejects_label_smoothing_the_kind_cannot_take(
    kind: str, label_smoothing: float
) -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_logps_with_margin(torch.zeros(2)), kind=kind, label_smoothing=label_smoothing)


def test_dpo_rejects_unknown_kind_bad_beta_and_mismatched_shapes() -> None:
    inputs = _logps_with_margin(torch.zeros(2))
    with pytest.raises(
        ValueError, match=r"valid: sigmoid, ipo, hinge, robust.*Did you mean 'sigmoid'"
    ):
        dpo_loss(*inputs, kind="sigmod")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*inputs, beta=0.0)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(*inputs[:3], torch.zeros(2, 1))


def test_registering_a_kind_makes_it_available_by_name() -> None:
    @register_dpo_loss("test-squared-logit")
    def squared(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
        return (beta * h) ** 2

    try:
        result = dpo_loss(
            *_logps_with_margin(torch.tensor([3.0])), beta=2.0, kind="test-squared-logit"
        )
        assert result[0].item() == pytest.approx(36.0)
        with pytest.raises(ValueError, match="already registered"):
            register_dpo_loss("test-squared-logit")(squared)
    finally:
        DPO_LOSSES.unregister("test-squared-logit")
    assert "test-squared-logit" not in DPO_LOSSES


@pytest.mark.parametrize(
    ("kind", "label_smoothing"), [("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
def test_dpo_loss_gradcheck(kind: str, label_smoothing: float) -> None:
    inputs = tuple(torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(
        lambda *x: dpo_loss(*x, beta=0.7, kind=kind, label_smoothing=label_smoothing)[0], inputs
    )


def test_reward_losses_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])  # d = 1, -0.5
    bt = reward_model_loss(chosen, rejected)
    torch.testing.assert_close(bt, torch.tensor([-_log_sigmoid(1.0), -_log_sigmoid(-0.5)]))
    margin = torch.tensor([0.5, 2.0])
    bt_margin = reward_model_loss(chosen, rejected, margin, kind="bt")
    torch.testing.assert_close(bt_margin, torch.tensor([-_log_sigmoid(0.5), -_log_sigmoid(-2.5)]))
    weighted = reward_model_loss(chosen, rejected, margin, kind="margin_weighted")
    torch.testing.assert_close(weighted, torch.tensor([-_log_sigmoid(0.5), -_log_sigmoid(-1.0)]))
    torch.testing.assert_close(reward_model_loss(chosen, rejected, kind="margin_weighted"), bt)


def test_reward_hinge_is_zero_beyond_the_margin() -> None:
    chosen, rejected = torch.tensor([1.3, 2.0, 0.0]), torch.zeros(3)
    torch.testing.assert_close(
        reward_model_loss(chosen, rejected, kind="hinge"), torch.tensor([0.0, 0.0, 1.0])
    )
    torch.testing.assert_close(
        reward_model_loss(chosen, rejected, margin=1.5, kind="hinge"), torch.tensor([0.2, 0.0, 1.5])
    )


def test_reward_loss_rejects_bad_shapes_and_unknown_kind() -> None:
    with pytest.raises(ValueError, match="rejected has shape"):
        reward_model_loss(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="margin has shape"):
        reward_model_loss(torch.zeros(4), torch.zeros(4), margin=torch.zeros(4, 1))
    with pytest.raises(
        ValueError, match=r"unknown reward loss 'ranking'; valid: bt, margin_weighted, hinge"
    ):
        reward_model_loss(torch.zeros(4), torch.zeros(4), kind="ranking")


def _plackett_luce_brute_force(scores: torch.Tensor) -> torch.Tensor:
    out = []
    for row in scores.tolist():
        nll = 0.0
        for i in range(len(row) - 1):
            nll -= row[i] - math.log(sum(math.exp(s) for s in row[i:]))
        out.append(nll)
    return torch.tensor(out, dtype=scores.dtype)


def test_plackett_luce_with_two_items_is_bradley_terry() -> None:
    scores = torch.randn(7, 2)
    torch.testing.assert_close(
        plackett_luce_loss(scores), reward_model_loss(scores[:, 0], scores[:, 1], kind="bt")
    )


def test_plackett_luce_matches_brute_force_for_four_items() -> None:
    scores = torch.randn(5, 4, dtype=torch.float64) * 3
    torch.testing.assert_close(plackett_luce_loss(scores), _plackett_luce_brute_force(scores))


def test_plackett_luce_probabilities_of_all_rankings_sum_to_one() -> None:
    scores = torch.randn(4, dtype=torch.float64)
    rankings = torch.stack([scores[list(p)] for p in itertools.permutations(range(4))])
    assert torch.exp(-plackett_luce_loss(rankings)).sum().item() == pytest.approx(1.0)


def test_plackett_luce_mask_drops_items_from_the_ranking() -> None:
    scores = torch.tensor([[2.0, 1.0, -1.0, 50.0], [0.3, 9.0, -2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 0]])
    expected = torch.cat(
        [
            _plackett_luce_brute_force(scores[:1, :3]),
            _plackett_luce_brute_force(scores[1:2, [0, 2, 3]]),
            torch.zeros(1),  # a single real item: nothing to rank
        ]
    )
    torch.testing.assert_close(plackett_luce_loss(scores, mask), expected)


@pytest.mark.parametrize("masked", [False, True])
def test_plackett_luce_gradcheck(masked: bool) -> None:
    scores = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
    assert torch.autograd.gradcheck(
        lambda s: plackett_luce_loss(s, mask if masked else None), (scores,)
    )


def test_bf16_inputs_give_float32_results_close_to_float32() -> None:
    inputs = [torch.randn(6) * 10 for _ in range(4)]
    bf16 = [t.bfloat16() for t in inputs]
    rounded = [t.float() for t in bf16]
    for kind in DPO_LOSSES:
        if is_reference_free(kind):
            # Per-token mean log-probs: negative.
            result = reference_free_dpo_loss(-bf16[0].abs(), -bf16[1].abs(), 0.1, kind)
            expected = reference_free_dpo_loss(-rounded[0].abs(), -rounded[1].abs(), 0.1, kind)
        else:
            result = dpo_loss(*bf16, beta=0.1, kind=kind)
            expected = dpo_loss(*rounded, beta=0.1, kind=kind)
        assert all(t.dtype == torch.float32 for t in result)
        for got, want in zip(result, expected, strict=True):
            torch.testing.assert_close(got, want)
    rm = reward_model_loss(bf16[0], bf16[1], margin=bf16[2].abs(), kind="bt")
    assert rm.dtype == torch.float32
    torch.testing.assert_close(rm, reward_model_loss(rounded[0], rounded[1], rounded[2].abs()))
    scores = torch.randn(3, 4)
    pl = plackett_luce_loss(scores.bfloat16())
    assert pl.dtype == torch.float32
    torch.testing.assert_close(pl, plackett_luce_loss(scores.bfloat16().float()))


# --- cost model (Safe RLHF) -----------------------------------------------------------------


def test_cost_model_loss_matches_hand_values() -> None:
    from alignkit.ops.preference import cost_model_loss

    # Pair 0: chosen safer (dS > 0), rejected unsafe: pairwise on c_r - c_c.
    # Pair 1: chosen less safe (dS < 0): pairwise on c_c - c_r.  Pair 2: dS = 0: no pairwise.
    c_c = torch.tensor([-1.0, 2.0, 0.5])
    c_r = torch.tensor([1.5, -0.5, 0.5])
    d_s = torch.tensor([2.0, -3.0, 0.0])
    unsafe_c = torch.tensor([0.0, 1.0, 0.0])
    unsafe_r = torch.tensor([1.0, 0.0, 0.0])
    pairwise, sign = cost_model_loss(c_c, c_r, d_s, unsafe_c, unsafe_r)

    def nls(x: float) -> float:
        return math.log1p(math.exp(-x))  # -log sigmoid(x)

    assert pairwise.tolist() == pytest.approx([nls(2.5), nls(2.5), 0.0], abs=1e-6)
    expected_sign = [nls(1.0) + nls(1.5), nls(2.0) + nls(0.5), nls(-0.5) + nls(-0.5)]
    assert sign.tolist() == pytest.approx(expected_sign, abs=1e-6)


def test_cost_model_loss_gradient_pushes_unsafe_costs_up() -> None:
    from alignkit.ops.preference import cost_model_loss

    c_c = torch.zeros(1, requires_grad=True)
    c_r = torch.zeros(1, requires_grad=True)
    pairwise, sign = cost_model_loss(
        c_c, c_r, torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])
    )
    (pairwise + sign).sum().backward()
    assert c_r.grad.item() < 0 < c_c.grad.item()  # descent raises the unsafe cost, lowers safe


def test_length_normalized_nll_by_hand_and_its_gradient() -> None:
    summed = torch.tensor([-6.0, -1.5, 0.0], requires_grad=True)
    counts = torch.tensor([3, 2, 0])
    nll = length_normalized_nll(summed, counts)
    # 6/3, 1.5/2, and an empty response counts as one token: 0.
    torch.testing.assert_close(nll, torch.tensor([2.0, 0.75, 0.0]))
    nll.sum().backward()
    # Descent raises the winner's log-prob, by 1/|y| per unit of loss.
    torch.testing.assert_close(summed.grad, torch.tensor([-1 / 3, -0.5, -1.0]))


def test_length_normalized_nll_upcasts_and_checks_shapes() -> None:
    half = length_normalized_nll(torch.tensor([-3.0], dtype=torch.bfloat16), torch.tensor([2]))
    assert half.dtype == torch.float32 and half.item() == 1.5
    with pytest.raises(ValueError, match="token_counts has shape"):
        length_normalized_nll(torch.zeros(2), torch.ones(3))


# --- pair orientation, multi-task reward loss, reward-loss registry ---------------------------


def test_orient_pairs_swaps_exactly_the_flipped_pairs():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    winner, loser = orient_pairs(chosen, rejected, torch.tensor([False, True, False]))
    assert winner.tolist() == [1.0, 20.0, 3.0] and loser.tolist() == [10.0, 2.0, 30.0]
    winner, loser = orient_pairs(chosen, rejected, torch.tensor([1, 1, 1]))
    assert winner.tolist() == rejected.tolist() and loser.tolist() == chosen.tolist()
    with pytest.raises(ValueError, match="differ"):
        orient_pairs(chosen, rejected[:2], torch.tensor([True, False]))


def test_multitask_reward_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    chosen_aux = {"helpfulness": torch.tensor([0.5, 1.0]), "safety": torch.tensor([0.0, 2.0])}
    rejected_aux = {"helpfulness": torch.tensor([0.0, 3.0]), "safety": torch.tensor([-1.0, 0.0])}
    helpfulness = (torch.tensor([1.0, float("nan")]), torch.tensor([0.0, 1.0]))
    is_safe = (torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))
    total, parts = multitask_reward_loss(
        chosen,
        rejected,
        chosen_aux=chosen_aux,
        rejected_aux=rejected_aux,
        helpfulness=helpfulness,
        is_safe=is_safe,
        task_weights={"preference": 2.0, "safety": 0.5},
    )
    preference = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(2.0)))) / 2
    # MSE over the three labelled responses: (0.5-1)^2, (0-0)^2, (3-1)^2.
    help_mse = (0.25 + 0.0 + 4.0) / 3
    bce = [
        F.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(y)).item()
        for z, y in [(0.0, 1.0), (2.0, 1.0), (-1.0, 0.0), (0.0, 1.0)]
    ]
    safety = sum(bce) / 4
    assert parts["preference"].item() == pytest.approx(preference, rel=1e-6)
    assert parts["helpfulness"].item() == pytest.approx(help_mse, rel=1e-6)
    assert parts["safety"].item() == pytest.approx(safety, rel=1e-6)
    assert total.item() == pytest.approx(2.0 * preference + help_mse + 0.5 * safety, rel=1e-6)
    with pytest.raises(ConfigError, match="unknown task weight 'safe'"):
        multitask_reward_loss(chosen, rejected, task_weights={"safe": 1.0})


def test_a_registered_reward_loss_is_selected_by_name():
    @register_reward_loss("test-squared")
    def squared(diff, margin):
        return (1.0 - diff).square()

    try:
        losses = reward_model_loss(torch.tensor([3.0]), torch.tensor([1.0]), kind="test-squared")
        assert losses.item() == pytest.approx(1.0)
        with pytest.raises(ValueError, match="reward loss name 'bt' is already registered"):
            register_reward_loss("bt")(squared)
    finally:
        REWARD_LOSSES.unregister("test-squared")
    with pytest.raises(ValueError, match="Did you mean 'hinge'"):
        reward_model_loss(torch.zeros(1), torch.zeros(1), kind="hinje")


def test_length_normalized_logps_divide_by_the_token_count_and_leave_empty_responses_at_zero():
    from alignkit.ops.preference import length_normalized_logps

    summed = torch.tensor([-6.0, -1.5, 0.0])
    counts = torch.tensor([3, 2, 0])
    torch.testing.assert_close(
        length_normalized_logps(summed, counts), torch.tensor([-2.0, -0.75, 0.0])
    )
    with pytest.raises(ValueError, match="token_counts has shape"):
        length_normalized_logps(summed, counts[:2])


def test_simpo_loss_is_the_closed_form_with_its_margin():
    from alignkit.ops.preference import simpo_loss

    # beta (avg_c - avg_r) - gamma = 2 * (-1 - (-2)) - 0.5 = 1.5, and 2 * (-3 + 1) - 0.5 = -4.5.
    chosen, rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    expected = torch.tensor([-_log_sigmoid(1.5), -_log_sigmoid(-4.5)])
    torch.testing.assert_close(simpo_loss(chosen, rejected, beta=2.0, gamma=0.5), expected)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        simpo_loss(chosen, rejected, gamma=-0.1)


def test_orpo_loss_is_the_chosen_nll_minus_lambda_log_sigmoid_of_the_log_odds_ratio():
    from alignkit.ops.preference import orpo_loss

    chosen, rejected = torch.tensor([-0.5, -2.0]), torch.tensor([-1.5, -0.25])
    lam = 0.1

    def log_odds(avg: float) -> float:
        p = math.exp(avg)
        return math.log(p / (1 - p))

    expected = [
        -c - lam * _log_sigmoid(log_odds(c) - log_odds(r))
        for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)
    ]
    got = orpo_loss(chosen, rejected, lam=lam)
    torch.testing.assert_close(got, torch.tensor(expected))
    # Near p = 1 (avg -> 0) and p = 0 (avg -> -inf) the log odds stay finite, and their grads.
    extreme = torch.tensor([-1e-6, -60.0], requires_grad=True)
    loss = orpo_loss(extreme, extreme.flip(0), lam=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(extreme.grad).all()


def test_reference_free_kinds_are_declared_at_registration_and_kept_apart_from_dpo_loss():
    from alignkit.ops.preference import simpo_loss

    assert is_reference_free("simpo") and is_reference_free("orpo")
    assert not any(is_reference_free(kind) for kind in ("sigmoid", "ipo", "hinge", "robust"))
    logps = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match="'simpo' is reference-free: use reference_free_dpo_loss"):
        dpo_loss(logps, logps, logps, logps, kind="simpo")
    with pytest.raises(ValueError, match="'sigmoid' needs reference log-probs"):
        reference_free_dpo_loss(logps, logps, beta=1.0, kind="sigmoid")
    with pytest.raises(ValueError, match="gamma is not defined for kind='orpo'"):
        reference_free_dpo_loss(logps, logps, beta=1.0, kind="orpo", gamma=0.5)

    losses_, chosen_rewards, _ = reference_free_dpo_loss(logps, logps.flip(0), 2.0, "simpo")
    torch.testing.assert_close(losses_, simpo_loss(logps, logps.flip(0), 2.0, 0.5))
    torch.testing.assert_close(chosen_rewards, 2.0 * logps)

    @register_dpo_loss("test_free", reference_free=True)
    def _free(chosen, rejected, beta, gamma):
        return -(chosen - rejected) * beta

    try:
        assert is_reference_free("test_free")
        out = reference_free_dpo_loss(logps, logps.flip(0), 3.0, "test_free")[0]
        torch.testing.assert_close(out, torch.tensor([-3.0, 3.0]))
    finally:
        DPO_LOSSES.unregister("test_free")
