"""Evaluation and ensemble formulas: calibration, rank correlation, confidence intervals,
combining the rewards of an ensemble and its uncertainty (seed 002 §4.3, exercise 4.3, §4.3.6).

Ensemble tensors are ``[K, N]``: K members' scores of N items. Pair tensors hold the members'
margins ``d[k, i] = r_k(chosen_i) - r_k(rejected_i)`` and preference probabilities
``p[k, i] = sigmoid(d[k, i])`` (Bradley-Terry).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "COMBINATIONS",
    "UNCERTAINTIES",
    "binary_entropy",
    "calibration_bins",
    "combine_rewards",
    "expected_calibration_error",
    "kendall_tau",
    "pair_uncertainty",
    "trimmed_mean",
    "wilson_interval",
]

COMBINATIONS = ("mean", "weighted", "median", "trimmed_mean")
UNCERTAINTIES = ("std", "variance_ratio", "entropy")


def calibration_bins(
    probs: Tensor, outcomes: Tensor, bins: int = 10
) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-width bins of ``probs`` in [0, 1]: ``(count, mean confidence, mean outcome)`` per bin.

    Bin b holds ``b/bins <= p < (b+1)/bins`` (the last bin also holds p = 1). Empty bins
    report 0.
    """
    probs, outcomes = probs.detach().double().flatten(), outcomes.detach().double().flatten()
    index = torch.floor(probs * bins).clamp(0, bins - 1).long()
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(probs))
    conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, probs)
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, outcomes)
    safe = count.clamp(min=1)
    return count, conf / safe, hits / safe


def expected_calibration_error(probs: Tensor, outcomes: Tensor, bins: int = 10) -> float:
    """ECE = ``sum_b (n_b / n) * |mean outcome_b - mean confidence_b|`` over equal-width bins.

    ``probs`` are predicted probabilities that the event happens (for a reward model,
    ``sigmoid(r_chosen - r_rejected)``, the probability that chosen is preferred) and
    ``outcomes`` 1 where it did (0.5 for a tie). 0 is perfect calibration.
    Source: Naeini et al., "Obtaining Well Calibrated Probabilities Using Bayesian Binning" (2015);
    Guo et al., "On Calibration of Modern Neural Networks" (2017), eq. 3.
    """
    count, conf, hits = calibration_bins(probs, outcomes, bins)
    total = count.sum()
    if total == 0:
        return float("nan")
    return float((count / total * (hits - conf).abs()).sum())


def kendall_tau(x: Tensor, y: Tensor) -> float:
    """Kendall's tau-b between two score vectors of the same items.

    ``tau_b = (C - D) / sqrt((n0 - T_x) * (n0 - T_y))`` with C / D the concordant / discordant
    pairs, ``n0 = n(n-1)/2`` and T_x, T_y the pairs tied in x, y (Kendall 1945). 1 for the same
    order, -1 for the reversed one; ``nan`` when either vector is constant or n < 2.
    O(n^2) memory over the pairs: meant for ranking groups (responses to one prompt).
    """
    x, y = x.detach().double().flatten(), y.detach().double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"x has {x.numel()} items, y {y.numel()}")
    n = x.numel()
    if n < 2:
        return float("nan")
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    sx = torch.sign(x[:, None] - x[None, :])[upper]
    sy = torch.sign(y[:, None] - y[None, :])[upper]
    untied_x, untied_y = (sx != 0).sum().item(), (sy != 0).sum().item()
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return float((sx * sy).sum().item() / math.sqrt(untied_x * untied_y))


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (z = 1.96: 95 %).

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` (Wilson 1927). Ties counted
    as half a success are allowed (``successes`` need not be an integer). ``(nan, nan)`` for n = 0.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def trimmed_mean(scores: Tensor, trim: float = 0.2, dim: int = 0) -> Tensor:
    """Mean of ``scores`` along ``dim`` after dropping the ``floor(trim * K)`` lowest and highest.

    ``trim`` in [0, 0.5); with K members and ``g = floor(trim * K)``,
    ``mean(sorted[g : K - g])`` (Tukey's trimmed mean). ``trim = 0`` is the mean.
    """
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    k = scores.shape[dim]
    g = math.floor(trim * k)
    ordered = scores.sort(dim=dim).values
    return ordered.narrow(dim, g, k - 2 * g).mean(dim=dim)


def combine_rewards(
    scores: Tensor, method: str = "mean", weights: Tensor | None = None, trim: float = 0.2
) -> Tensor:
    """Combine members' scores ``[K, N]`` into one ``[N]``.

    - ``mean``: ``(1/K) sum_k r_k``
    - ``weighted``: ``sum_k w_k r_k / sum_k w_k`` (weights e.g. the members' validation accuracy)
    - ``median``: the median over members (the lower middle value for even K, torch's rule); one
      corrupted member out of K >= 3 cannot move it outside the others' range
    - ``trimmed_mean``: ``trimmed_mean(scores, trim)``
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [K, N], got {tuple(scores.shape)}")
    if method == "mean":
        return scores.mean(dim=0)
    if method == "weighted":
        if weights is None or weights.shape != scores.shape[:1]:
            raise ValueError(f"weighted needs weights of shape [{scores.shape[0]}]")
        w = weights.to(scores.dtype)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return (w[:, None] * scores).sum(dim=0) / w.sum()
    if method == "median":
        return scores.median(dim=0).values
    if method == "trimmed_mean":
        return trimmed_mean(scores, trim, dim=0)
    raise ValueError(f"unknown combination {method!r}; expected one of {', '.join(COMBINATIONS)}")


def binary_entropy(p: Tensor) -> Tensor:
    """``H(p) = -p ln p - (1-p) ln(1-p)`` in nats, 0 at p in {0, 1}; maximum ln 2 at p = 0.5."""
    p = p.double().clamp(0.0, 1.0)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def pair_uncertainty(margins: Tensor, kind: str = "std") -> Tensor:
    """Uncertainty of an ensemble about each pair, from member margins ``d [K, N]``.

    - ``std``: the members' standard deviation of d (population, 1/K), in reward units
    - ``variance_ratio``: ``1 - f_m / K``, f_m the number of members voting for the modal
      preference (``d > 0`` vs ``d <= 0``; Freeman 1965); 0 when all agree, at most 1/2
    - ``entropy``: ``H(mean_k sigmoid(d_k))``, the entropy of the ensemble's mean preference
      probability (the predictive entropy of a Bayesian-model-average, Lakshminarayanan et al.
      2017); ln 2 at complete uncertainty
    """
    if margins.dim() != 2:
        raise ValueError(f"margins must be [K, N], got {tuple(margins.shape)}")
    margins = margins.detach().double()
    k = margins.shape[0]
    if kind == "std":
        return margins.std(dim=0, correction=0)
    if kind == "variance_ratio":
        votes = (margins > 0).double().sum(dim=0)
        return 1.0 - torch.maximum(votes, k - votes) / k
    if kind == "entropy":
        return binary_entropy(torch.sigmoid(margins).mean(dim=0))
    raise ValueError(f"unknown uncertainty {kind!r}; expected one of {', '.join(UNCERTAINTIES)}")
