"""The sampling distribution (temperature, top-k, top-p) and the inverse-CDF draw."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops.sampling import inverse_cdf_sample, sampling_distribution

NEG_INF = -math.inf


def _chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value: P(chi2_{k-1} >= sum (o - e)^2 / e)."""
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(observed.numel() - 1, dtype=torch.double)
    return float(1 - torch.special.gammainc(dof / 2, statistic / 2))


def test_temperature_top_k_and_top_p_on_hand_values():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    torch.testing.assert_close(sampling_distribution(logits, 0.5), (logits / 0.5).log_softmax(-1))
    top2 = sampling_distribution(logits, top_k=2)
    assert torch.isfinite(top2).sum() == 2
    torch.testing.assert_close(top2[0, :2].exp(), torch.tensor([3.0, 2.0]).softmax(0))
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...: 0.8 needs the first two tokens
    nucleus = sampling_distribution(logits, top_p=0.8)
    assert torch.isfinite(nucleus).sum() == 2
    torch.testing.assert_close(nucleus[0, :2].exp(), probs[:2] / probs[:2].sum())
    # The token crossing p is kept: p just above the first token's mass keeps two.
    assert torch.isfinite(sampling_distribution(logits, top_p=float(probs[0]) + 1e-4)).sum() == 2
    # top-p acts on the top-k distribution: with k = 3, 0.9 of it is reached by two tokens.
    both = sampling_distribution(logits, top_k=3, top_p=0.9)
    kept = probs[:3] / probs[:3].sum()
    assert float(kept[:2].sum()) > 0.9 and torch.isfinite(both).sum() == 2
    # Off: k = 0 or >= V, p = 1; a -inf logit (a suppressed token) stays -inf.
    masked = logits.clone()
    masked[0, 1] = NEG_INF
    for off in (dict(), dict(top_k=8), dict(top_k=0, top_p=1.0)):
        torch.testing.assert_close(sampling_distribution(masked, **off), masked.log_softmax(-1))
    with pytest.raises(ValueError, match="greedy decoding is an argmax"):
        sampling_distribution(logits, 0.0)
    with pytest.raises(ValueError, match="top_p in"):
        sampling_distribution(logits, top_p=0.0)


def test_bfloat16_logits_give_float32_logprobs():
    logits = torch.randn(3, 11).to(torch.bfloat16)
    out = sampling_distribution(logits, 0.9, top_k=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3))


def test_inverse_cdf_picks_the_first_token_whose_cdf_exceeds_the_uniform():
    logprobs = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.5, 0.5, 0.0]]))
    seed = 123
    tokens = inverse_cdf_sample(logprobs, torch.Generator().manual_seed(seed))
    u = torch.rand(2, 1, generator=torch.Generator().manual_seed(seed))
    cdf = torch.tensor([[0.1, 0.1, 0.7, 1.0], [0.0, 0.5, 1.0, 1.0]])
    expected = [int((cdf[i] <= u[i]).sum()) for i in range(2)]  # brute force per row
    assert tokens.tolist() == expected


def test_inverse_cdf_samples_follow_the_distribution_and_never_draw_zero_mass():
    # Zero-mass tokens first, in the middle and last: the last nonzero token ends the CDF.
    probs = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.15, 0.4, 0.1, 0.0])
    n = 20000
    logprobs = probs.log().expand(n, -1)
    tokens = inverse_cdf_sample(logprobs, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[probs == 0].sum() == 0
    support = probs > 0
    assert _chi_square_pvalue(counts[support], probs[support].double() * n) > 0.001
    # Power: a slightly different distribution is rejected by the same counts.
    shifted = probs[support].double() + torch.tensor([0.03, -0.03, 0.0, 0.0, 0.0])
    assert _chi_square_pvalue(counts[support], shifted * n) < 1e-6


def test_one_uniform_per_row_from_the_generator_only():
    logprobs = torch.randn(5, 7).log_softmax(-1)
    generator = torch.Generator().manual_seed(9)
    state = torch.get_rng_state()
    first = inverse_cdf_sample(logprobs, generator)
    assert torch.equal(torch.get_rng_state(), state)
    reference = torch.Generator().manual_seed(9)
    torch.rand(5, 1, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())
    assert torch.equal(first, inverse_cdf_sample(logprobs, torch.Generator().manual_seed(9)))
