"""Truncated importance weights and the effective sample size (ops/importance.py)."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops.importance import effective_sample_size, truncated_importance_weights


def test_truncated_importance_weights_on_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9), -1.0]], requires_grad=True)
    behaviour = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.1), -1.0]])
    weights = truncated_importance_weights(logp, behaviour, max_weight=3.0)
    # 0.5/0.25 = 2 (kept), 0.2/0.4 = 0.5 (small weights are not raised), 0.9/0.1 = 9 -> 3, 1.
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 3.0, 1.0]]))
    assert not weights.requires_grad
    assert weights.dtype == torch.float32


def test_truncated_importance_weights_correct_an_expectation_exactly_when_the_cap_never_binds():
    generator = torch.Generator().manual_seed(0)
    log_pi = torch.log_softmax(torch.randn(6, dtype=torch.float64, generator=generator), -1)
    log_mu = torch.log_softmax(torch.randn(6, dtype=torch.float64, generator=generator), -1)
    f = torch.randn(6, dtype=torch.float64, generator=generator)
    uncapped = truncated_importance_weights(log_pi, log_mu, max_weight=1e6)
    # E_mu[w f] = sum_y mu(y) pi(y)/mu(y) f(y) = E_pi[f], exactly.
    assert (log_mu.exp() * uncapped * f).sum().item() == pytest.approx((log_pi.exp() * f).sum())
    capped = truncated_importance_weights(log_pi, log_mu, max_weight=1.5)
    torch.testing.assert_close(capped, (log_pi - log_mu).exp().clamp(max=1.5))


def test_truncated_importance_weights_stay_finite_and_check_arguments():
    weights = truncated_importance_weights(torch.tensor([0.0, 0.0]), torch.tensor([-1e4, 1e4]), 2.0)
    assert weights.tolist() == [2.0, pytest.approx(math.exp(-20.0))]
    with pytest.raises(ValueError, match="max_weight must be a finite number >= 1"):
        truncated_importance_weights(torch.zeros(2), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="differ"):
        truncated_importance_weights(torch.zeros(2), torch.zeros(3), 2.0)


def test_effective_sample_size_closed_forms():
    assert effective_sample_size(torch.full((8,), 0.3)).item() == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([5.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    # (1 + 2 + 3)^2 / (1 + 4 + 9) = 36 / 14; the masked 100 does not count.
    weights = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert effective_sample_size(weights, mask).item() == pytest.approx(36.0 / 14.0)
    assert effective_sample_size(torch.zeros(4)).item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        effective_sample_size(weights, mask[:1])
