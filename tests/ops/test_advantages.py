from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops.advantages import (
    ADVANTAGE_ESTIMATORS,
    available_advantage_estimators,
    discounted_returns,
    gae,
    get_advantage_estimator,
    grpo_advantages,
    register_advantage_estimator,
    reinforce_pp_advantages,
    reinforce_returns,
    rloo_advantages,
    state_values,
    terminal_rewards,
    zero_std_fraction,
)
from alignkit.ops.stats import Moments

# --- helpers --------------------------------------------------------------------------------


def _padded_mask(lengths: list[int], time: int, left: list[bool]) -> torch.Tensor:
    """Contiguous responses of the given lengths, left- or right-padded per row."""
    mask = torch.zeros(len(lengths), time, dtype=torch.long)
    for row, (length, left_padded) in enumerate(zip(lengths, left, strict=True)):
        if left_padded:
            mask[row, time - length :] = 1
        else:
            mask[row, :length] = 1
    return mask


def _random_mask(batch: int, time: int, generator: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(0, time + 1, (batch,), generator=generator).tolist()
    lengths[0] = time  # one full row, and (for batch > 1) one empty row
    if batch > 1:
        lengths[1] = 0
    left = (torch.rand(batch, generator=generator) < 0.5).tolist()
    return _padded_mask(lengths, time, left)


def _brute_force_gae(rewards, values, mask, gamma, lam):
    """Textbook sum form: A_t = sum_k (gamma*lam)^k delta_{t+k} over each row's valid positions."""
    advantages = torch.zeros(rewards.shape, dtype=torch.float64)
    for row in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[row, t]]
        for j, t in enumerate(steps):
            total = 0.0
            for k in range(j, len(steps)):
                next_value = float(values[row, steps[k + 1]]) if k + 1 < len(steps) else 0.0
                here = steps[k]
                delta = float(rewards[row, here]) + gamma * next_value - float(values[row, here])
                total += (gamma * lam) ** (k - j) * delta
            advantages[row, t] = total
    return advantages


# --- discounted returns and GAE -------------------------------------------------------------


def test_discounted_returns_by_hand_with_left_and_right_padding():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0], [99.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    # G = [1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3] = [2.75, 3.5, 3]
    expected = torch.tensor([[2.75, 3.5, 3.0, 0.0], [0.0, 2.75, 3.5, 3.0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma=0.5), expected)
    torch.testing.assert_close(
        discounted_returns(rewards, mask, gamma=1.0), torch.tensor([[6.0, 5, 3, 0], [0, 6, 5, 3]])
    )


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    # delta = r_t + gamma V_{t+1} - V_t, with V after the last token = 0
    d2 = 1.0 - 0.4
    d1 = 0.0 + 0.9 * 0.4 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.72 * d2
    a0 = d0 + 0.72 * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("batch", "time"), [(1, 1), (3, 5), (8, 17), (5, 40)])
def test_gae_matches_brute_force_on_ragged_masks(seed, batch, time):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, time, generator=generator)
    values = torch.randn(batch, time, generator=generator)
    mask = _random_mask(batch, time, generator)
    gamma, lam = [(1.0, 1.0), (0.99, 0.95), (0.5, 0.3)][seed]
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = _brute_force_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        returns, ((expected + values.double()) * mask).float(), atol=1e-5, rtol=1e-5
    )


def test_gae_skips_holes_in_the_mask_like_padding():
    # Not needed for contiguous responses, but tool-call observations inside a response are
    # masked this way: the next *valid* token is the next step.
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randn(6, 12, generator=generator)
    values = torch.randn(6, 12, generator=generator)
    mask = (torch.rand(6, 12, generator=generator) < 0.6).long()
    advantages, _ = gae(rewards, values, mask, 0.97, 0.9)
    expected = _brute_force_gae(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(advantages, expected.float(), atol=1e-5, rtol=1e-5)


def test_masked_positions_do_not_affect_any_token_estimator():
    generator = torch.Generator().manual_seed(4)
    rewards = torch.randn(6, 10, generator=generator)
    values = torch.randn(6, 10, generator=generator)
    mask = _random_mask(6, 10, generator)
    padding = mask == 0
    garbage_rewards = torch.where(padding, torch.randn(6, 10, generator=generator) * 1e3, rewards)
    garbage_values = torch.where(padding, torch.nan, values)
    row, col = padding.nonzero()[0].tolist()
    garbage_rewards[row, col] = torch.inf

    clean = gae(rewards, values, mask, 0.99, 0.95)
    dirty = gae(garbage_rewards, garbage_values, mask, 0.99, 0.95)
    for a, b in zip(clean, dirty, strict=True):
        torch.testing.assert_close(a, b)
        assert (a[padding] == 0).all()
    for fn in (discounted_returns, reinforce_returns, reinforce_pp_advantages):
        torch.testing.assert_close(fn(rewards, mask, 0.9), fn(garbage_rewards, mask, 0.9))


def test_gae_special_cases():
    generator = torch.Generator().manual_seed(5)
    rewards = torch.randn(4, 9, generator=generator)
    values = torch.randn(4, 9, generator=generator)
    mask = _random_mask(4, 9, generator)
    # lam = 1, V = 0: advantages are the discounted returns.
    advantages, returns = gae(rewards, torch.zeros_like(values), mask, 0.9, 1.0)
    torch.testing.assert_close(advantages, discounted_returns(rewards, mask, 0.9))
    torch.testing.assert_close(returns, advantages)
    # gamma = lam = 1: A_t = (sum of rewards from t) - V_t (Monte-Carlo return minus baseline).
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(
        advantages, (discounted_returns(rewards, mask, 1.0) - values) * mask, atol=1e-5, rtol=1e-5
    )
    # lam = 0: one-step TD error.
    single = gae(torch.tensor([[2.0]]), torch.tensor([[0.5]]), torch.ones(1, 1), 0.9, 0.0)[0]
    assert single.item() == pytest.approx(1.5)  # bootstrap 0 after the last token


def test_gae_accepts_bfloat16_and_returns_float32_without_gradient():
    values = torch.randn(2, 5, requires_grad=True)
    advantages, returns = gae(torch.randn(2, 5).bfloat16(), values, torch.ones(2, 5), 1.0, 0.95)
    assert advantages.dtype == returns.dtype == torch.float32
    assert not advantages.requires_grad and not returns.requires_grad


def test_token_estimators_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        discounted_returns(torch.zeros(3), torch.ones(3), 1.0)


# --- REINFORCE and REINFORCE++ --------------------------------------------------------------


def test_reinforce_pp_whitens_returns_over_all_valid_tokens():
    generator = torch.Generator().manual_seed(6)
    rewards = torch.randn(5, 8, generator=generator)
    mask = _random_mask(5, 8, generator)
    advantages = reinforce_pp_advantages(rewards, mask, gamma=0.95)
    valid = mask.bool()
    returns = discounted_returns(rewards, mask, 0.95)[valid]
    expected = (returns - returns.mean()) / torch.sqrt(returns.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(advantages[valid], expected)
    assert advantages[valid].mean().abs() < 1e-6
    assert advantages[valid].std(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)
    assert (advantages[~valid] == 0).all()


def test_reinforce_returns_normalise_over_the_batch_by_hand():
    # One terminal reward per sequence, gamma = 1: returns are [1, 1] and [-1, -1, -1].
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean, std = -0.2, math.sqrt((2 * 1.2**2 + 3 * 0.8**2) / 4)
    expected = torch.tensor([[1.2 / std, 1.2 / std, 0.0], [-0.8 / std, -0.8 / std, -0.8 / std]])
    assert mean == pytest.approx((2 - 3) / 5)
    torch.testing.assert_close(reinforce_returns(rewards, mask, gamma=1.0), expected)


# --- group estimators -----------------------------------------------------------------------


def test_grpo_on_a_hand_example_with_singleton_ties_and_interleaved_groups():
    scores = torch.tensor([1.0, 7.0, 0.0, 0.1, 0.0, 0.1, 1.0, 0.1, 2.0, 5.0])
    groups = torch.tensor([10, 3, 10, 5, 10, 5, 10, 5, -1, -1])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # unbiased std of [1, 0, 0, 1] is sqrt(1/3)
    b = 1.5 / (math.sqrt(4.5) + 1e-6)  # unbiased std of [2, 5] is sqrt(4.5)
    expected = torch.tensor([a, 0.0, -a, 0, -a, 0, a, 0, -b, b])
    advantages = grpo_advantages(scores, groups)
    torch.testing.assert_close(advantages, expected)
    # Group 5 has three equal scores 0.1, not exactly representable: still exactly 0.
    assert (advantages[[3, 5, 7]] == 0).all()
    # Dr. GRPO: no division by the std.
    dr = grpo_advantages(scores, groups.tolist(), scale="none")
    torch.testing.assert_close(dr, torch.tensor([0.5, 0, -0.5, 0, -0.5, 0, 0.5, 0, -1.5, 1.5]))


def test_rloo_on_a_hand_example_with_singleton_and_ties():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 4.0, 2.0, 5.0, 0.3, 0.3])
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 3])
    # A_i = s_i - mean of the other three: 1 - 1/3 and 0 - 2/3.
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, -3.0, 3.0, 0.0, 0.0])
    advantages = rloo_advantages(scores, groups)
    torch.testing.assert_close(advantages, expected)
    assert (advantages[[4, 7, 8]] == 0).all()


def test_group_estimators_match_a_per_group_loop_on_random_groups():
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(60, generator=generator, dtype=torch.float64)
    groups = torch.randint(0, 15, (60,), generator=generator) * 1000 - 7000  # sparse, negative ids
    grpo = grpo_advantages(scores, groups, eps=1e-6)
    rloo = rloo_advantages(scores, groups)
    for group in groups.unique():
        members = (groups == group).nonzero().flatten()
        s = scores[members]
        if len(members) == 1:
            assert grpo[members].item() == 0 and rloo[members].item() == 0
            continue
        torch.testing.assert_close(grpo[members], (s - s.mean()) / (s.std() + 1e-6))
        leave_one_out = torch.stack([torch.cat([s[:i], s[i + 1 :]]).mean() for i in range(len(s))])
        torch.testing.assert_close(rloo[members], s - leave_one_out)


def test_group_estimators_validate_shapes():
    with pytest.raises(ValueError, match="must match scores"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"scores must be \[N\]"):
        rloo_advantages(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


# --- registry -------------------------------------------------------------------------------


def test_registry_names_and_uniform_signature():
    assert set(available_advantage_estimators()) >= {
        "gae",
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce",
        "reinforce_pp",
    }
    mask = _padded_mask([3, 2, 4, 1], time=4, left=[True, False, False, True])
    token_rewards = torch.zeros(4, 4)
    token_rewards[0, 3], token_rewards[1, 1], token_rewards[2, 3], token_rewards[3, 3] = 1, 0, 3, 5
    token_rewards[1, 3] = 100.0  # padding: must not count towards the score
    values = torch.randn(4, 4)
    group_index = torch.tensor([0, 0, 1, 1])
    for name in available_advantage_estimators():
        advantages, returns = get_advantage_estimator(name)(
            token_rewards, mask, values=values, group_index=group_index, gamma=1.0, lam=0.95
        )
        assert advantages.shape == returns.shape == (4, 4)
        assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()

    grpo, _ = get_advantage_estimator("grpo")(token_rewards, mask, group_index=group_index)
    per_sequence = grpo_advantages(torch.tensor([1.0, 0.0, 3.0, 5.0]), group_index)
    torch.testing.assert_close(grpo, per_sequence[:, None] * mask)
    rloo, _ = get_advantage_estimator("rloo")(token_rewards, mask, group_index=group_index)
    torch.testing.assert_close(rloo, torch.tensor([1.0, -1.0, -2.0, 2.0])[:, None] * mask)


def test_registry_errors_name_the_problem():
    with pytest.raises(
        ValueError, match=r"unknown advantage estimator 'grpoo'.*Did you mean 'grpo'"
    ):
        get_advantage_estimator("grpoo")
    with pytest.raises(ValueError, match="'gae' needs values; given: token_rewards, mask"):
        get_advantage_estimator("gae")(torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="'rloo' needs group_index"):
        get_advantage_estimator("rloo")(torch.zeros(1, 2), torch.ones(1, 2), group_index=None)
    with pytest.raises(ValueError, match="'grpo' needs mask, group_index"):
        get_advantage_estimator("grpo")(token_rewards=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="advantage estimator name 'gae' is already registered"):
        register_advantage_estimator("gae", needs=("values",))(gae)


def _adapter_batch():
    """Ragged, left/right-padded responses with rewards on every token (not just the last)."""
    generator = torch.Generator().manual_seed(21)
    mask = _padded_mask([4, 2, 5, 3, 1, 5], time=6, left=[True, False, False, True, False, True])
    token_rewards = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    values = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    group_index = torch.tensor([7, 7, 7, 2, 2, 2])
    return token_rewards, mask, values, group_index


def test_each_registered_adapter_gives_the_direct_functions_values():
    token_rewards, mask, values, group_index = _adapter_batch()
    inputs = {
        "token_rewards": token_rewards,
        "mask": mask,
        "values": values,
        "group_index": group_index,
        "gamma": 0.9,
        "lam": 0.7,
    }
    # Sequence scores by hand: the sum of each row's response-token rewards.
    scores = torch.stack(
        [token_rewards[b][mask[b].bool()].sum() for b in range(token_rewards.shape[0])]
    )
    per_token = mask.to(torch.float64)
    discounted = discounted_returns(token_rewards, mask, 0.9)
    expected = {
        "gae": gae(token_rewards, values, mask, gamma=0.9, lam=0.7),
        "grpo": (grpo_advantages(scores, group_index)[:, None] * per_token,) * 2,
        "dr_grpo": (grpo_advantages(scores, group_index, scale="none")[:, None] * per_token,) * 2,
        "rloo": (rloo_advantages(scores, group_index)[:, None] * per_token,) * 2,
        "reinforce": (reinforce_returns(token_rewards, mask, 0.9), discounted),
        "reinforce_pp": (reinforce_pp_advantages(token_rewards, mask, 0.9), discounted),
    }
    assert set(expected) <= set(available_advantage_estimators())
    for name, (advantages, returns) in expected.items():
        got_advantages, got_returns = get_advantage_estimator(name)(**inputs)
        torch.testing.assert_close(got_advantages, advantages, msg=name)
        torch.testing.assert_close(got_returns, returns, msg=name)
    # The settings reach the estimators: another gamma/lam gives other values.
    other = get_advantage_estimator("gae")(**{**inputs, "lam": 0.9})[0]
    assert (other - expected["gae"][0]).abs().max() > 1e-3
    other = get_advantage_estimator("reinforce_pp")(**{**inputs, "gamma": 1.0})[0]
    assert (other - expected["reinforce_pp"][0]).abs().max() > 1e-3
    # REINFORCE divides by std + eps, REINFORCE++ by sqrt(var + eps): on returns with variance
    # near eps the two differ, and each adapter must give its own.
    tiny = {**inputs, "token_rewards": 1e-4 * token_rewards}
    pp = get_advantage_estimator("reinforce_pp")(**tiny)[0]
    plain = get_advantage_estimator("reinforce")(**tiny)[0]
    torch.testing.assert_close(pp, reinforce_pp_advantages(1e-4 * token_rewards, mask, 0.9))
    torch.testing.assert_close(plain, reinforce_returns(1e-4 * token_rewards, mask, 0.9))
    assert (pp - plain).abs().max() > 1e-2


def test_process_global_moments_whiten_each_shard_like_the_whole_batch():
    token_rewards, mask, _, _ = _adapter_batch()
    whole_pp = reinforce_pp_advantages(token_rewards, mask, 0.9)
    whole_reinforce = reinforce_returns(token_rewards, mask, 0.9)
    shards = [slice(0, 2), slice(2, 6)]  # two "processes" of unequal token counts
    returns = discounted_returns(token_rewards, mask, 0.9)
    local = [Moments.of(returns[shard], mask[shard]) for shard in shards]
    # What a trainer does: all-reduce (here: sum) the stacked moments.
    global_moments = Moments.from_tensor(local[0].tensor() + local[1].tensor())
    for shard in shards:
        for name, whole in [("reinforce_pp", whole_pp), ("reinforce", whole_reinforce)]:
            advantages, _ = get_advantage_estimator(name)(
                token_rewards[shard], mask[shard], gamma=0.9, moments=global_moments
            )
            torch.testing.assert_close(advantages, whole[shard])
        torch.testing.assert_close(
            reinforce_pp_advantages(token_rewards[shard], mask[shard], 0.9, global_moments),
            whole_pp[shard],
        )
    # Without them each shard whitens on its own: a different result.
    alone = reinforce_pp_advantages(token_rewards[shards[0]], mask[shards[0]], 0.9)
    assert (alone - whole_pp[shards[0]]).abs().max() > 1e-2


def test_an_estimator_registered_outside_declares_its_inputs_and_receives_only_those():
    received = {}

    @register_advantage_estimator("test-baseline", needs=("baseline_scores",))
    def baseline_estimator(*, token_rewards, mask, baseline_scores):
        received.update(token_rewards=token_rewards, baseline_scores=baseline_scores)
        scores = (token_rewards * mask).sum(dim=1)
        advantages = (scores - baseline_scores)[:, None] * mask
        return advantages, advantages

    try:
        token_rewards, mask, values, group_index = _adapter_batch()
        estimator = get_advantage_estimator("test-baseline")
        assert estimator.needs == ("baseline_scores",)
        baseline = torch.linspace(-1, 1, 6, dtype=torch.float64)
        # A trainer passes everything it has; the estimator sees only what it declares.
        advantages, _ = estimator(
            token_rewards=token_rewards,
            mask=mask,
            values=values,
            group_index=group_index,
            gamma=0.9,
            baseline_scores=baseline,
        )
        assert set(received) == {"token_rewards", "baseline_scores"}
        scores = torch.stack([token_rewards[b][mask[b].bool()].sum() for b in range(6)])
        torch.testing.assert_close(advantages, (scores - baseline)[:, None] * mask)
        with pytest.raises(ValueError, match="'test-baseline' needs baseline_scores"):
            estimator(token_rewards=token_rewards, mask=mask, values=values)
    finally:
        ADVANTAGE_ESTIMATORS.unregister("test-baseline")
    with pytest.raises(ValueError, match="unknown advantage estimator 'test-baseline'"):
        get_advantage_estimator("test-baseline")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimators_give_the_same_results_on_cuda():
    generator = torch.Generator().manual_seed(8)
    rewards = torch.randn(6, 20, generator=generator)
    values = torch.randn(6, 20, generator=generator)
    mask = _random_mask(6, 20, generator)
    scores, groups = torch.randn(12, generator=generator), torch.arange(12) // 3
    for cpu, gpu in [
        (
            gae(rewards, values, mask, 0.99, 0.9),
            gae(rewards.cuda(), values.cuda(), mask.cuda(), 0.99, 0.9),
        ),
        ((grpo_advantages(scores, groups),), (grpo_advantages(scores.cuda(), groups.cuda()),)),
        ((rloo_advantages(scores, groups),), (rloo_advantages(scores.cuda(), groups.cuda()),)),
    ]:
        for a, b in zip(cpu, gpu, strict=True):
            torch.testing.assert_close(a, b.cpu())


# --- the estimators' inputs, group statistics, process-global moments --------------------


def test_terminal_rewards_put_each_score_on_the_last_response_token():
    mask = _padded_mask([2, 3, 0, 1], time=5, left=[False, True, False, True])
    scores = torch.tensor([1.5, -2.0, 7.0, math.nan])
    rewards = terminal_rewards(scores, mask)
    expected = torch.zeros(4, 5)
    expected[0, 1] = 1.5  # right-padded: the 2nd column
    expected[1, 4] = -2.0  # left-padded: the last column
    # Row 2 has no response token (no reward anywhere); row 3's NaN score is 0.
    torch.testing.assert_close(rewards, expected, rtol=0, atol=0)
    # Brute force over random layouts: the last True of each row, and nothing else.
    generator = torch.Generator().manual_seed(3)
    mask = _random_mask(8, 7, generator)
    scores = torch.randn(8, generator=generator, dtype=torch.float64)
    rewards = terminal_rewards(scores, mask)
    assert rewards.dtype == torch.float64
    for b in range(8):
        columns = mask[b].nonzero().flatten().tolist()
        want = torch.zeros(7, dtype=torch.float64)
        if columns:
            want[columns[-1]] = scores[b]
        torch.testing.assert_close(rewards[b], want, rtol=0, atol=0)


def test_state_values_are_the_head_one_position_before_each_token():
    generator = torch.Generator().manual_seed(4)
    mask = _random_mask(6, 8, generator)
    head = torch.randn(6, 8, generator=generator, requires_grad=True)
    values = state_values(head, mask)
    for b in range(6):
        for t in range(8):
            want = head[b, t - 1].item() if mask[b, t] and t > 0 else 0.0
            assert values[b, t].item() == pytest.approx(want), (b, t)
    # The critic's loss is taken on them: the gradient reaches the head at t - 1 only.
    values.sum().backward()
    expected = torch.zeros(6, 8)
    expected[:, :-1] = mask[:, 1:].float()
    torch.testing.assert_close(head.grad, expected)


def test_zero_std_fraction_counts_groups_whose_applicable_scores_are_all_equal():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, math.nan, 2.0, 2.0, math.nan, math.nan])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])
    # Group 0 tied, group 1 not, group 2 tied once its NaN is left out, group 3 has no score.
    assert zero_std_fraction(scores, groups).item() == pytest.approx(2 / 3)
    assert zero_std_fraction(torch.full((3,), math.nan), torch.tensor([0, 0, 1])).item() == 1.0
    # Brute force on random groups of random integer scores.
    generator = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (40,), generator=generator).float()
    groups = torch.randint(0, 9, (40,), generator=generator) * 7
    ties = [len(set(scores[groups == g].tolist())) == 1 for g in groups.unique().tolist()]
    assert zero_std_fraction(scores, groups).item() == pytest.approx(sum(ties) / len(ties))


def test_every_registered_estimator_accepts_an_empty_batch():
    # A process whose every score is NaN still joins the statistics' all-reduce.
    inputs = {
        "token_rewards": torch.zeros(0, 4),
        "mask": torch.zeros(0, 4, dtype=torch.bool),
        "values": torch.zeros(0, 4),
        "group_index": torch.zeros(0, dtype=torch.long),
        "gamma": 1.0,
        "lam": 0.95,
        "reduce_moments": lambda moments: moments,
    }
    for name in available_advantage_estimators():
        advantages, returns = get_advantage_estimator(name)(**inputs)
        assert advantages.shape == returns.shape == (0, 4), name


def test_reduce_moments_makes_reinforce_statistics_span_every_shard():
    token_rewards, mask, _, _ = _adapter_batch()
    shards = [slice(0, 2), slice(2, 6)]
    returns = discounted_returns(token_rewards, mask, 0.9)
    every = [Moments.of(returns[shard], mask[shard]) for shard in shards]
    calls = []

    def all_reduce(mine: Moments) -> Moments:  # what an all-reduce (sum) over 2 processes gives
        calls.append(mine)
        return Moments.from_tensor(every[0].tensor() + every[1].tensor())

    for name, whole_fn in [
        ("reinforce", reinforce_returns),
        ("reinforce_pp", reinforce_pp_advantages),
    ]:
        whole = whole_fn(token_rewards, mask, 0.9)
        for shard, mine in zip(shards, every, strict=True):
            advantages, _ = get_advantage_estimator(name)(
                token_rewards=token_rewards[shard],
                mask=mask[shard],
                gamma=0.9,
                reduce_moments=all_reduce,
            )
            torch.testing.assert_close(advantages, whole[shard])
            torch.testing.assert_close(calls[-1].tensor(), mine.tensor())  # its own moments
        alone, _ = get_advantage_estimator(name)(
            token_rewards=token_rewards[shards[0]], mask=mask[shards[0]], gamma=0.9
        )
        assert (alone - whole[shards[0]]).abs().max() > 1e-2
