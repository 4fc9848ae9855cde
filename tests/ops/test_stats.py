from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignkit.errors import CheckpointError
from alignkit.ops.stats import (
    Moments,
    RunningMeanStd,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pairwise_accuracy,
    violation_rate,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 0, 1], [0, 1, 1]])  # selects 1, 3, 5, 6


def test_masked_sum_on_hand_values():
    assert masked_sum(X, MASK).item() == 15.0
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([4.0, 11.0]))
    torch.testing.assert_close(masked_sum(X, MASK, dim=0), torch.tensor([1.0, 5.0, 9.0]))


def test_masked_mean_on_hand_values():
    assert masked_mean(X, MASK).item() == 3.75
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([2.0, 5.5]))
    torch.testing.assert_close(masked_mean(X, MASK.bool(), dim=0), torch.tensor([1.0, 5.0, 4.5]))


def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
    assert masked_mean(X, torch.zeros_like(MASK)).item() == 0.0
    row_empty = torch.tensor([[0, 0, 0], [1, 1, 0]])
    torch.testing.assert_close(masked_mean(X, row_empty, dim=1), torch.tensor([0.0, 4.5]))


def test_masked_statistics_ignore_nan_and_inf_at_masked_positions():
    poisoned = X.clone()
    poisoned[0, 1] = math.nan
    poisoned[1, 0] = math.inf
    assert masked_sum(poisoned, MASK).item() == 15.0
    assert masked_mean(poisoned, MASK).item() == 3.75
    assert math.isfinite(masked_var(poisoned, MASK).item())
    assert torch.isfinite(masked_whiten(poisoned, MASK)).all()


def test_masked_mean_uses_float_mask_values_as_weights():
    weights = torch.tensor([[0.5, 0.0, 1.5], [0.0, 0.0, 0.0]])
    # (0.5 * 1 + 1.5 * 3) / 2 = 2.5
    assert masked_mean(X, weights).item() == 2.5


def test_masked_var_on_hand_values():
    # Values 1, 3, 5, 6: mean 3.75, squared deviations sum to 14.75.
    torch.testing.assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(14.75 / 4))
    torch.testing.assert_close(masked_var(X, MASK), torch.tensor(14.75 / 3))
    selected = X[MASK.bool()]
    torch.testing.assert_close(masked_var(X, MASK), selected.var(unbiased=True))


def test_masked_var_degenerate_masks_give_zero():
    one = torch.tensor([[0, 1, 0], [0, 0, 0]])
    assert masked_var(X, one, unbiased=True).item() == 0.0
    assert masked_var(X, one, unbiased=False).item() == 0.0
    assert masked_var(X, torch.zeros_like(MASK)).item() == 0.0


def test_masked_whiten_on_hand_values():
    x = torch.tensor([1.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 0])
    # mean 2, unbiased variance 2; the masked position comes back as 0.
    expected = torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])
    torch.testing.assert_close(masked_whiten(x, mask, eps=0.0), expected)
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False, eps=0.0), expected + torch.tensor([2.0, 2.0, 0])
    )


def test_masked_whiten_gives_zero_mean_and_unit_variance_over_the_mask():
    x = torch.randn(8, 20) * 5 + 3
    mask = torch.rand(8, 20) < 0.6
    whitened = masked_whiten(x, mask)
    assert abs(masked_mean(whitened, mask).item()) < 1e-6
    assert abs(masked_var(whitened, mask).item() - 1) < 1e-5
    assert (whitened[~mask] == 0).all()


def test_explained_variance_of_perfect_and_mean_predictions():
    returns = torch.randn(4, 10)
    mask = torch.rand(4, 10) < 0.7
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0, abs=1e-7)
    mean_prediction = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(mean_prediction, returns, mask).item() == pytest.approx(0, abs=1e-6)


def test_explained_variance_on_hand_values():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0, 50.0])
    values = torch.tensor([1.0, 2.0, 3.0, 5.0, -7.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    # Residuals 0, 0, 0, -1: variance 0.1875; returns' variance 1.25; 1 - 0.15 = 0.85.
    torch.testing.assert_close(explained_variance(values, returns, mask), torch.tensor(0.85))


def test_explained_variance_is_zero_without_return_variance():
    returns = torch.full((6,), 2.0)
    assert explained_variance(torch.randn(6), returns, torch.ones(6)).item() == 0.0
    assert explained_variance(torch.randn(6), torch.randn(6), torch.zeros(6)).item() == 0.0


# --- RunningMeanStd ----------------------------------------------------------------------


def test_running_mean_std_over_batches_equals_statistics_of_the_concatenation():
    generator = np.random.default_rng(0)
    batches = [generator.normal(5.0, 3.0, size=(n, 3)) for n in (1, 7, 50, 2, 300)]
    stats = RunningMeanStd(shape=(3,))
    for batch in batches:
        stats.update(torch.from_numpy(batch))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(stats.mean.numpy(), everything.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.var.numpy(), everything.var(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.std.numpy(), everything.std(0), rtol=1e-10, atol=1e-10)
    assert stats.count == len(everything)
    assert stats.mean.dtype == torch.float64


def test_running_mean_std_counts_only_masked_tokens():
    rewards = torch.randn(3, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    stats = RunningMeanStd()
    stats.update(rewards[:2], mask[:2])
    stats.update(rewards[2:], mask[2:])  # an empty batch changes nothing
    selected = rewards[mask.bool()].numpy()
    assert stats.count == 7
    np.testing.assert_allclose(stats.mean.item(), selected.mean(), rtol=1e-12)
    np.testing.assert_allclose(stats.var.item(), selected.var(), rtol=1e-12)


def test_running_mean_std_starts_as_the_identity_normaliser():
    stats = RunningMeanStd(shape=(2,))
    assert stats.count == 0
    x = torch.randn(5, 2)
    torch.testing.assert_close(stats.normalize(x), x)


def test_running_mean_std_normalize_standardises_the_data_seen():
    data = torch.randn(400, dtype=torch.float64) * 4 + 10
    stats = RunningMeanStd()
    for batch in data.split(64):
        stats.update(batch)
    normalised = stats.normalize(data)
    assert abs(normalised.mean().item()) < 1e-9
    assert abs(normalised.std(unbiased=False).item() - 1) < 1e-7
    assert stats.normalize(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.float32


def test_running_mean_std_state_dict_round_trip_continues_identically():
    first, second = torch.randn(10, 2), torch.randn(7, 2)
    original = RunningMeanStd(shape=(2,))
    original.update(first)
    restored = RunningMeanStd(shape=(2,))
    restored.load_state_dict(original.state_dict())
    original.update(second)
    restored.update(second)
    torch.testing.assert_close(restored.mean, original.mean, rtol=0, atol=0)
    torch.testing.assert_close(restored.var, original.var, rtol=0, atol=0)
    assert restored.count == original.count == 17


def test_running_mean_std_rejects_incompatible_state_and_shapes():
    stats = RunningMeanStd(shape=(2,))
    with pytest.raises(CheckpointError, match="shape"):
        stats.load_state_dict(RunningMeanStd(shape=(3,)).state_dict())
    with pytest.raises(CheckpointError, match="missing"):
        stats.load_state_dict({"mean": torch.zeros(2)})
    with pytest.raises(ValueError, match="must end with"):
        stats.update(torch.randn(4, 3))
    with pytest.raises(ValueError, match="mask shape"):
        stats.update(torch.randn(4, 2), torch.ones(5))


# --- Moments --------------------------------------------------------------------------------


def test_moments_of_masked_values_match_numpy():
    moments = Moments.of(X, MASK)
    selected = np.array([1.0, 3.0, 5.0, 6.0])
    assert moments.count.item() == 4
    assert moments.mean.item() == pytest.approx(selected.mean())
    assert moments.var().item() == pytest.approx(selected.var(ddof=1))
    assert moments.var(unbiased=False).item() == pytest.approx(selected.var())
    assert moments.std().item() == pytest.approx(selected.std(ddof=1))
    assert moments.var().item() == pytest.approx(masked_var(X, MASK).item())


def test_moments_merge_and_round_trip_equal_the_moments_of_the_union():
    generator = torch.Generator().manual_seed(5)
    values = 3.0 + 2.0 * torch.randn(50, generator=generator)
    parts = [Moments.of(values[:7]), Moments.of(values[7:30]), Moments.of(values[30:])]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    reduced = Moments.from_tensor(sum(part.tensor() for part in parts))
    for moments in (merged, reduced):
        assert moments.mean.item() == pytest.approx(values.double().mean().item(), rel=1e-12)
        assert moments.var().item() == pytest.approx(values.double().var().item(), rel=1e-10)


def test_moments_of_empty_and_single_sets_are_zero_not_nan():
    empty = Moments.of(torch.ones(3), torch.zeros(3))
    assert (empty.count.item(), empty.mean.item(), empty.var().item()) == (0.0, 0.0, 0.0)
    single = Moments.of(torch.tensor([4.0]))
    assert (single.mean.item(), single.var().item(), single.var(unbiased=False).item()) == (
        4.0,
        0.0,
        0.0,
    )


def test_running_mean_std_update_moments_equals_update_on_the_data():
    generator = torch.Generator().manual_seed(6)
    batches = [torch.randn(n, generator=generator) * 2 + 1 for n in (5, 9, 3)]
    from_data, from_moments = RunningMeanStd(), RunningMeanStd()
    for batch in batches:
        from_data.update(batch)
        from_moments.update_moments(Moments.of(batch))
    everything = torch.cat(batches).double()
    for rms in (from_data, from_moments):
        assert rms.mean.item() == pytest.approx(everything.mean().item(), rel=1e-12)
        assert rms.var.item() == pytest.approx(everything.var(unbiased=False).item(), rel=1e-10)
    assert from_moments.count == 17
    from_moments.update_moments(Moments.of(torch.ones(2), torch.zeros(2)))  # empty: no change
    assert from_moments.count == 17
    with pytest.raises(ValueError, match="moments of shape"):
        RunningMeanStd(shape=(2,)).update_moments(Moments.of(torch.ones(3)))


# --- pairwise accuracy ----------------------------------------------------------------------


def test_pairwise_accuracy_counts_ties_as_half_by_default():
    chosen = torch.tensor([2.0, 1.0, 0.5, 3.0])
    rejected = torch.tensor([1.0, 1.0, 0.7, 3.0])  # win, tie, loss, tie
    assert pairwise_accuracy(chosen, rejected).item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert pairwise_accuracy(chosen, rejected, ties=0.0).item() == pytest.approx(1 / 4)
    mask = torch.tensor([1, 0, 1, 0])  # only the win and the loss count
    assert pairwise_accuracy(chosen, rejected, mask=mask).item() == pytest.approx(0.5)
    assert pairwise_accuracy(chosen, rejected, mask=torch.zeros(4)).item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        pairwise_accuracy(chosen, rejected[:3])


def test_masked_whiten_with_reduced_moments_whitens_each_shard_like_the_whole():
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, generator=generator) * 3 + 2
    mask = torch.rand(6, 5, generator=generator) > 0.3
    whole = masked_whiten(x, mask)
    shards = [slice(0, 1), slice(1, 6)]  # two "processes" of unequal sizes
    every = Moments.from_tensor(sum(Moments.of(x[s], mask[s]).tensor() for s in shards))
    for shard in shards:
        got = masked_whiten(x[shard], mask[shard], reduce_moments=lambda _mine: every)
        torch.testing.assert_close(got, whole[shard], rtol=1e-5, atol=1e-6)
    alone = masked_whiten(x[shards[1]], mask[shards[1]])
    assert (alone - whole[shards[1]]).abs().max() > 1e-2
    # shift_mean=False keeps the global mean.
    kept = masked_whiten(x[shards[1]], mask[shards[1]], False, reduce_moments=lambda _: every)
    torch.testing.assert_close(kept, masked_whiten(x, mask, False)[shards[1]])


def test_violation_rate_is_the_share_of_scored_costs_above_zero():
    costs = torch.tensor([0.5, -1.0, 0.0, math.nan, 2.0])
    assert violation_rate(costs).item() == pytest.approx(2 / 4)  # 0 is safe; NaN not scored
    assert violation_rate(torch.full((3,), math.nan)).item() == 0.0
    assert violation_rate(torch.tensor([1.0], dtype=torch.float64)).dtype == torch.float64
