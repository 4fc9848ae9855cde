"""The Safe-DPO cost estimate and Lagrange multiplier against seed 000's formulas."""

from __future__ import annotations

import io
import math

import pytest
import torch

from alignkit.errors import CheckpointError
from alignkit.ops.lagrange import (
    LagrangeMultiplier,
    estimate_cost,
    estimate_cost_from_data,
    lagrangian_combine,
)


def seed_reference(j_c_values, init, lr, lo=1e-6, hi=10.0):
    """Seed 000's update, transcribed line by line as plain Python."""
    lambda_log = math.log(init)
    lambda_param = init
    j_c_ema = None
    history = []
    for j_c_batch in j_c_values:
        j_c_ema = j_c_batch if j_c_ema is None else 0.95 * j_c_ema + 0.05 * j_c_batch
        lambda_log = lambda_log + lr * lambda_param * j_c_ema
        lambda_param = math.exp(lambda_log)
        lambda_param = min(max(lambda_param, lo), hi)
        lambda_log = math.log(lambda_param)
        history.append((lambda_param, j_c_ema))
    return history


def scripted_costs() -> list[float]:
    # Unsafe phase (climbs to the max), safe phase, then noisy values around zero.
    noise = torch.Generator().manual_seed(3)
    tail = (torch.randn(60, generator=noise, dtype=torch.float64) * 0.7).tolist()
    return [2.0] * 60 + [-1.0] * 80 + tail


def test_log_rule_matches_seed_reference_to_1e_12_including_max_clamp():
    costs = scripted_costs()
    multiplier = LagrangeMultiplier(init=1.0, lr=0.05)
    reference = seed_reference(costs, init=1.0, lr=0.05)
    values = [multiplier.update(j) for j in costs]
    for step, (value, (ref_value, _)) in enumerate(zip(values, reference, strict=True)):
        assert value == pytest.approx(ref_value, rel=1e-12, abs=1e-12), step
    assert multiplier.j_c_ema == pytest.approx(reference[-1][1], rel=1e-12, abs=1e-12)
    assert max(values) == 10.0  # the max clamp was exercised
    assert multiplier.steps == len(costs)
    assert multiplier.log_value == pytest.approx(math.log(multiplier.value), abs=1e-15)


def test_lambda_moves_with_the_sign_of_the_smoothed_cost():
    multiplier = LagrangeMultiplier(init=1.0, lr=0.05)
    previous = multiplier.value
    grew = shrank = 0
    for j_c in scripted_costs():
        value = multiplier.update(j_c)
        # The log rule, step by step: λ' = λ·exp(lr·λ·EMA(J_C)), clamped to [min, max].
        expected = previous * math.exp(0.05 * previous * multiplier.j_c_ema)
        assert value == pytest.approx(min(max(expected, multiplier.min_value), 10.0), rel=1e-12)
        if multiplier.j_c_ema > 0 and previous < 10.0:
            assert value > previous
            grew += 1
        elif multiplier.j_c_ema < 0:
            assert value < previous
            shrank += 1
        previous = value
    assert grew > 10 and shrank > 50


def test_first_update_uses_the_batch_value_as_ema():
    multiplier = LagrangeMultiplier(init=2.0, lr=0.1)
    multiplier.update(0.5)
    assert multiplier.j_c_ema == 0.5
    assert multiplier.value == pytest.approx(2.0 * math.exp(0.1 * 2.0 * 0.5), rel=1e-15)


def test_strongly_negative_cost_clamps_at_min_never_below():
    multiplier = LagrangeMultiplier(init=10.0, lr=1.0, min_value=1e-6)
    values = [multiplier.update(-5.0) for _ in range(20)]
    assert values[0] == 1e-6  # exp(ln 10 - 50) underflows the floor at once
    assert all(v == 1e-6 for v in values)
    assert multiplier.log_value == math.log(1e-6)
    # Positive cost lifts it again, from the floor.
    assert multiplier.update(1e6) > 1e-6


def test_huge_positive_cost_clamps_at_max_without_overflow():
    multiplier = LagrangeMultiplier(init=5.0, lr=1.0)
    assert multiplier.update(1e300) == 10.0


def test_linear_rule_reproduces_old_update_without_ema():
    data_costs = [
        float(estimate_cost_from_data(torch.tensor([0.2, 0.6, 0.4]))),  # -0.4
        1.0,
        -1.0,
        0.3,
    ]
    multiplier = LagrangeMultiplier(init=1.0, lr=0.1, rule="linear")
    expected, ema = 1.0, None
    for j_c in data_costs:
        expected = max(expected + 0.1 * j_c, 1e-6)
        ema = j_c if ema is None else 0.95 * ema + 0.05 * j_c
        assert multiplier.update(j_c) == pytest.approx(expected, abs=1e-15)
        assert multiplier.j_c_ema == pytest.approx(ema, abs=1e-15)


def test_linear_rule_hits_the_floor_long_before_the_log_rule():
    cost = -0.5  # what -mean(ΔS) typically gives: every pair has its safer response chosen
    linear = LagrangeMultiplier(init=1.0, lr=0.01, rule="linear")
    log_rule = LagrangeMultiplier(init=1.0, lr=0.01)
    linear_floor_step = None
    for step in range(1, 2001):
        linear.update(cost)
        log_rule.update(cost)
        if linear_floor_step is None and linear.value == linear.min_value:
            linear_floor_step = step
    assert linear_floor_step == 200
    # The log rule decays like 1/(1 + lr·|J_C|·t): about 1/11 after 2000 steps.
    assert log_rule.value == pytest.approx(1 / 11, rel=0.05)


def test_linear_rule_with_zero_floor_reaches_zero():
    multiplier = LagrangeMultiplier(init=0.05, lr=0.1, min_value=0.0, rule="linear")
    assert multiplier.update(-1.0) == 0.0
    assert multiplier.log_value == -math.inf


def test_state_dict_round_trip_continues_identically():
    costs = scripted_costs()
    straight = LagrangeMultiplier(init=1.0, lr=0.05)
    first_half = LagrangeMultiplier(init=1.0, lr=0.05)
    for j_c in costs[:100]:
        straight.update(j_c)
        first_half.update(j_c)
    buffer = io.BytesIO()
    torch.save(first_half.state_dict(), buffer)
    buffer.seek(0)
    resumed = LagrangeMultiplier(init=1.0, lr=0.05)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.steps == 100
    for j_c in costs[100:]:
        assert resumed.update(j_c) == straight.update(j_c)
    assert resumed.state_dict() == straight.state_dict()


def test_fresh_state_dict_round_trip_keeps_first_update_semantics():
    source = LagrangeMultiplier()
    target = LagrangeMultiplier()
    target.load_state_dict(source.state_dict())
    target.update(0.7)
    assert target.j_c_ema == 0.7


def test_load_state_dict_rejects_mismatched_checkpoints():
    state = LagrangeMultiplier().state_dict()
    with pytest.raises(CheckpointError, match="rule"):
        LagrangeMultiplier(rule="linear").load_state_dict(state)
    with pytest.raises(CheckpointError, match="lacks"):
        LagrangeMultiplier().load_state_dict({"value": 1.0})
    with pytest.raises(CheckpointError, match="outside"):
        LagrangeMultiplier(max_value=0.5, init=0.5).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init": 11.0},
        {"init": 0.0},
        {"ema": 1.0},
        {"ema": -0.1},
        {"lr": -0.01},
        {"lr": math.nan},
        {"min_value": 0.0},  # the log rule needs a positive floor
        {"min_value": 2.0, "max_value": 1.0},
        {"max_value": math.inf},
        {"rule": "exp"},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs):
    # The message names the setting at fault (min/max share one message).
    name = "max_value" if "max_value" in kwargs else next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        LagrangeMultiplier(**kwargs)


def test_update_accepts_scalar_tensors_and_rejects_bad_values():
    multiplier = LagrangeMultiplier()
    assert multiplier.update(torch.tensor(0.25)) == LagrangeMultiplier().update(0.25)
    with pytest.raises(ValueError, match="scalar"):
        multiplier.update(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="finite"):
        multiplier.update(math.nan)
    assert multiplier.steps == 1  # a rejected value changes nothing


def test_estimate_cost_hand_example():
    logp_chosen = torch.tensor([-1.0, -5.0, -2.0, -3.0])
    logp_rejected = torch.tensor([-2.0, -1.0, -2.0, -4.0])
    delta_safety = torch.tensor([0.5, 1.0, 2.0, -0.3])
    # log-ratio signs [+, -, 0, +]; per pair -sign·ΔS = [-0.5, 1.0, 0, 0.3]
    cost = estimate_cost(logp_chosen, logp_rejected, delta_safety)
    assert cost.shape == ()
    assert cost.item() == pytest.approx(0.2, abs=1e-7)
    masked = estimate_cost(
        logp_chosen, logp_rejected, delta_safety, mask=torch.tensor([1, 0, 1, 1])
    )
    assert masked.item() == pytest.approx(-0.2 / 3, abs=1e-7)
    assert estimate_cost_from_data(delta_safety).item() == pytest.approx(-0.8, abs=1e-7)


def test_estimate_cost_sign_follows_the_policy_preference():
    delta_safety = torch.tensor([0.4, 1.2, 0.9])  # the chosen response is always the safer one
    safer_preferred = estimate_cost(torch.zeros(3), torch.full((3,), -1.0), delta_safety)
    unsafe_preferred = estimate_cost(torch.full((3,), -1.0), torch.zeros(3), delta_safety)
    assert safer_preferred.item() == pytest.approx(-delta_safety.mean().item())
    assert unsafe_preferred.item() == pytest.approx(delta_safety.mean().item())


def test_estimate_cost_computes_in_float32_for_bfloat16_inputs():
    cost = estimate_cost(
        torch.tensor([0.0, -3.0], dtype=torch.bfloat16),
        torch.tensor([-1.0, 0.0], dtype=torch.bfloat16),
        torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
    )
    assert cost.dtype == torch.float32
    assert cost.item() == pytest.approx((-0.5 + 0.25) / 2)


def test_lagrangian_combine_on_hand_values_and_signs():
    primary, constraint = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    # (1 + 2*3)/3, (-2 + 2*4)/3; without normalisation the plain sums.
    torch.testing.assert_close(
        lagrangian_combine(primary, constraint, 2.0), torch.tensor([7.0 / 3.0, 2.0])
    )
    torch.testing.assert_close(
        lagrangian_combine(primary, constraint, 2.0, normalize=False), torch.tensor([7.0, 6.0])
    )
    # Safe-PPO's advantages: a cost enters negated, (A_r - lam A_c) / (1 + lam).
    a_reward, a_cost = torch.tensor([1.0]), torch.tensor([0.5])
    assert lagrangian_combine(a_reward, -a_cost, 3.0).item() == pytest.approx((1 - 1.5) / 4)
    # lam = 0 is the primary alone; a tensor lam broadcasts.
    torch.testing.assert_close(lagrangian_combine(primary, constraint, 0.0), primary)
    lam = torch.tensor(1.0, requires_grad=True)
    lagrangian_combine(primary, constraint, lam).sum().backward()
    # d/dlam sum((p + lam c)/(1 + lam)) = sum(c - p)/(1 + lam)^2 = (2 + 6)/4.
    assert lam.grad.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        lagrangian_combine(primary, constraint, -0.1)
    with pytest.raises(ValueError, match="differ"):
        lagrangian_combine(primary, constraint[:1], 1.0)
