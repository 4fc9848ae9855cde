"""ops.evaluation against closed forms and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from alignkit.ops.evaluation import (
    binary_entropy,
    calibration_bins,
    combine_rewards,
    expected_calibration_error,
    kendall_tau,
    pair_uncertainty,
    trimmed_mean,
    wilson_interval,
)


def test_kendall_tau_perfect_reversed_and_brute_force() -> None:
    x = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7])
    assert kendall_tau(x, x * 2 + 1) == pytest.approx(1.0)
    assert kendall_tau(x, -x) == pytest.approx(-1.0)
    y = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0])
    concordant = discordant = ties_y = 0
    for i, j in itertools.combinations(range(5), 2):
        s = (x[i] - x[j]).sign() * (y[i] - y[j]).sign()
        concordant += int(s > 0)
        discordant += int(s < 0)
        ties_y += int(y[i] == y[j])
    expected = (concordant - discordant) / math.sqrt(10 * (10 - ties_y))
    assert kendall_tau(x, y) == pytest.approx(expected)
    assert math.isnan(kendall_tau(x, torch.ones(5)))


def test_ece_closed_form_and_overconfidence() -> None:
    # two bins used: p=0.85 (4 items, 3 hits) and p=0.25 (2 items, 1 hit)
    probs = torch.tensor([0.85, 0.85, 0.85, 0.85, 0.25, 0.25])
    outcomes = torch.tensor([1, 1, 1, 0, 1, 0.0])
    expected = 4 / 6 * abs(0.75 - 0.85) + 2 / 6 * abs(0.5 - 0.25)
    assert expected_calibration_error(probs, outcomes) == pytest.approx(expected)
    count, conf, hits = calibration_bins(probs, outcomes, bins=10)
    assert count[2] == 2 and count[8] == 4 and count.sum() == 6
    assert hits[8].item() == pytest.approx(0.75) and conf[2].item() == pytest.approx(0.25)
    # margins from a Bradley-Terry model: the true probabilities are calibrated, the
    # overconfident model's (margins x 5) are not
    g = torch.Generator().manual_seed(0)
    margins = torch.randn(20000, generator=g)
    truth = (torch.rand(20000, generator=g) < torch.sigmoid(margins)).float()
    calibrated = expected_calibration_error(torch.sigmoid(margins), truth)
    overconfident = expected_calibration_error(torch.sigmoid(5 * margins), truth)
    assert calibrated < 0.02
    assert overconfident > 0.1


def test_wilson_interval_known_value() -> None:
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # nan


def test_combinations_and_median_robustness() -> None:
    scores = torch.tensor([[1.0, 2.0], [1.2, 2.2], [0.8, 1.8], [100.0, -100.0]])
    assert combine_rewards(scores, "mean").tolist() == pytest.approx([25.75, -23.5])
    assert combine_rewards(scores[:3], "median").tolist() == pytest.approx([1.0, 2.0])
    w = torch.tensor([1.0, 1.0, 2.0, 0.0])
    assert combine_rewards(scores, "weighted", w).tolist() == pytest.approx([0.95, 1.95])
    # K=4, trim 0.25: drop the lowest and highest of each column
    assert combine_rewards(scores, "trimmed_mean", trim=0.25).tolist() == pytest.approx([1.1, 1.9])
    assert trimmed_mean(scores, 0.0).tolist() == pytest.approx([25.75, -23.5])
    with pytest.raises(ValueError, match="unknown combination"):
        combine_rewards(scores, "max")


def test_pair_uncertainty_closed_forms() -> None:
    margins = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0], [-1.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    assert pair_uncertainty(margins, "std").tolist() == pytest.approx([math.sqrt(2), 0, 0])
    assert pair_uncertainty(margins, "variance_ratio").tolist() == pytest.approx([0.25, 0, 0])
    p = torch.sigmoid(margins).mean(0)
    h = -(p * p.log() + (1 - p) * (1 - p).log())
    assert pair_uncertainty(margins, "entropy").tolist() == pytest.approx(h.tolist())
    assert pair_uncertainty(margins, "entropy")[2].item() == pytest.approx(math.log(2))
    assert binary_entropy(torch.tensor([0.0, 1.0])).tolist() == [0.0, 0.0]
