"""Geometric mixture, KL-symmetric α, Theorem 1's progress terms and the SNR search."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops.proposals import (
    disjoint_supports,
    exact_progress,
    geometric_mixture_logprobs,
    guarded_mixture_logprobs,
    kl_symmetry_alpha,
    log_ratio_scores,
    min_variance_proposal_logprobs,
    policy_gradient_variance,
    progress_terms,
    snr_alpha,
)

NEG_INF = -math.inf


def kl_reference(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) summed over q's support, directly from the definition."""
    q = logq.exp()
    terms = torch.where(q > 0, q * (logq - logp), torch.zeros_like(q))
    return terms.sum(-1)


def restricted_delta(logits_policy, logits_target, alpha):
    """Δ(α) = E_q[log π_t - log π_θ] with q ∝ π_θ^α π_t^(1-α) on the supports' intersection,
    computed with plain softmax arithmetic (an independent path from the library's)."""
    log_policy = torch.log_softmax(logits_policy.double(), -1)
    log_target = torch.log_softmax(logits_target.double(), -1)
    both = torch.isfinite(log_policy) & torch.isfinite(log_target)
    lp = log_policy[both]
    lt = log_target[both]
    q = torch.softmax(alpha * lp + (1 - alpha) * lt, -1)
    return float((q * (lt - lp)).sum())


def random_pair(seed: int, rows: int = 32, vocab: int = 50, temperature: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    policy = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2
    target = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2 / temperature
    return policy, target


# --- geometric_mixture_logprobs -------------------------------------------------------------


def masked_pair():
    policy = torch.tensor([[0.5, NEG_INF, 1.0, 2.0, -1.0], [1.0, 2.0, NEG_INF, 0.0, 0.3]])
    target = torch.tensor([[1.5, 0.2, NEG_INF, 0.0, 1.0], [NEG_INF, 0.1, 0.7, 0.0, -2.0]])
    return policy, target


def test_mixture_endpoints_are_exactly_the_two_distributions_even_with_minus_inf():
    policy, target = masked_pair()
    assert torch.equal(
        geometric_mixture_logprobs(policy, target, 1.0), torch.log_softmax(policy, -1)
    )
    assert torch.equal(
        geometric_mixture_logprobs(policy, target, 0.0), torch.log_softmax(target, -1)
    )
    per_row = geometric_mixture_logprobs(policy, target, torch.tensor([1.0, 0.0]))
    assert torch.equal(per_row[0], torch.log_softmax(policy[0], -1))
    assert torch.equal(per_row[1], torch.log_softmax(target[1], -1))


def test_mixture_is_normalised_and_matches_the_naive_formula():
    policy, target = random_pair(0, rows=8)
    alpha = torch.rand(8, dtype=torch.float64)
    logq = geometric_mixture_logprobs(policy, target, alpha)
    assert logq.dtype == torch.float64
    assert torch.allclose(logq.exp().sum(-1), torch.ones(8, dtype=torch.float64), atol=1e-12)
    a = alpha[:, None]
    naive = torch.log_softmax(
        a * torch.log_softmax(policy, -1) + (1 - a) * torch.log_softmax(target, -1), -1
    )
    assert torch.allclose(logq, naive, atol=1e-12)


def test_mixture_lives_on_the_intersection_of_supports():
    policy, target = masked_pair()
    logq = geometric_mixture_logprobs(policy, target, 0.3)
    outside = ~(torch.isfinite(policy) & torch.isfinite(target))
    assert torch.all(logq[outside] == NEG_INF)
    assert torch.all(torch.isfinite(logq[~outside]))
    assert torch.allclose(logq.exp().sum(-1), torch.ones(2), atol=1e-6)


def test_mixture_gradients_stay_finite_with_minus_inf_logits_and_disjoint_rows():
    policy, target = masked_pair()
    disjoint_policy = torch.tensor([[0.0, 1.0, NEG_INF, NEG_INF, NEG_INF]])
    disjoint_target = torch.tensor([[NEG_INF, NEG_INF, 0.5, 0.0, 1.0]])
    policy = torch.cat([policy, disjoint_policy]).requires_grad_(True)
    target = torch.cat([target, disjoint_target]).requires_grad_(True)
    alpha = torch.tensor([0.3, 0.8, 0.5], requires_grad=True)
    logq = geometric_mixture_logprobs(policy, target, alpha)
    (logq.exp() * torch.arange(5.0)).sum().backward()
    assert torch.all(torch.isfinite(policy.grad)) and torch.all(torch.isfinite(target.grad))
    assert torch.all(torch.isfinite(alpha.grad)) and torch.all(alpha.grad[:2] != 0)
    assert alpha.grad[2] == 0  # the disjoint row is the policy whatever α is


def test_mixture_of_disjoint_supports_falls_back_to_the_policy():
    policy = torch.tensor([[0.0, 1.0, NEG_INF, NEG_INF], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([[NEG_INF, NEG_INF, 0.5, 0.0], [1.0, 0.0, 0.0, 1.0]])
    assert disjoint_supports(policy, target).tolist() == [True, False]
    logq = geometric_mixture_logprobs(policy, target, 0.5)
    assert torch.equal(logq[0], torch.log_softmax(policy[0], -1))
    assert torch.all(torch.isfinite(logq[1]))
    # α = 0 still means the target exactly.
    assert torch.equal(
        geometric_mixture_logprobs(policy, target, 0.0)[0], torch.log_softmax(target[0], -1)
    )


def test_guarded_mixture_uses_the_policy_on_disjoint_rows_even_at_alpha_zero():
    policy = torch.tensor([[0.0, 1.0, NEG_INF, NEG_INF], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([[NEG_INF, NEG_INF, 0.5, 0.0], [1.0, 0.0, 0.0, 1.0]])
    logq, alpha, fallback = guarded_mixture_logprobs(policy, target, torch.zeros(2))
    assert fallback.tolist() == [True, False] and alpha.tolist() == [1.0, 0.0]
    assert torch.equal(logq[0], torch.log_softmax(policy[0], -1))
    assert torch.equal(logq[1], torch.log_softmax(target[1], -1))  # α = 0 elsewhere: the target


def test_log_ratio_scores_are_the_untruncated_log_ratio_at_the_temperature():
    policy, target = random_pair(3, rows=4, vocab=9)
    scores = log_ratio_scores(policy, target, temperature=0.7)
    expected = torch.log_softmax(target / 0.7, -1) - torch.log_softmax(policy / 0.7, -1)
    torch.testing.assert_close(scores, expected)
    # Brute force on one row: log(p_t(y) / p_θ(y)) from the probabilities themselves.
    p_policy = (policy[0] / 0.7).exp() / (policy[0] / 0.7).exp().sum()
    p_target = (target[0] / 0.7).exp() / (target[0] / 0.7).exp().sum()
    torch.testing.assert_close(scores[0], (p_target / p_policy).log())


def test_mixture_of_bfloat16_logits_is_float32_and_keeps_leading_dims():
    policy = torch.randn(2, 3, 40).to(torch.bfloat16)
    target = torch.randn(2, 3, 40).to(torch.bfloat16)
    logq = geometric_mixture_logprobs(policy, target, torch.full((2, 3), 0.5))
    assert logq.dtype == torch.float32 and logq.shape == (2, 3, 40)
    assert torch.allclose(logq.exp().sum(-1), torch.ones(2, 3), atol=1e-5)


def test_mixture_rejects_alpha_outside_unit_interval():
    policy, target = random_pair(0, rows=2)
    with pytest.raises(ValueError, match="alpha"):
        geometric_mixture_logprobs(policy, target, 1.5)


# --- kl_symmetry_alpha ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
def test_kl_symmetry_alpha_equalises_the_two_kls(seed, temperature):
    policy, target = random_pair(seed, temperature=temperature)
    result = kl_symmetry_alpha(policy, target)
    assert not result.flagged.any() and not result.fallback.any()
    assert torch.all((result.alpha > 0) & (result.alpha < 1))
    logq = geometric_mixture_logprobs(policy, target, result.alpha)
    kl_to_policy = kl_reference(logq, torch.log_softmax(policy, -1))
    kl_to_target = kl_reference(logq, torch.log_softmax(target, -1))
    assert torch.all((kl_to_policy - kl_to_target).abs() <= 1e-6)
    assert torch.all(result.delta.abs() <= 1e-6)


def test_kl_symmetry_alpha_is_the_chernoff_point():
    policy, target = random_pair(4, rows=6)
    result = kl_symmetry_alpha(policy, target)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    log_policy = torch.log_softmax(policy, -1)[:, None, :]
    log_target = torch.log_softmax(target, -1)[:, None, :]
    log_z = torch.logsumexp(grid[:, None] * log_policy + (1 - grid[:, None]) * log_target, -1)
    assert torch.allclose(result.alpha, grid[log_z.argmin(-1)], atol=1e-4)


def test_kl_symmetry_alpha_in_float32_is_close_to_float64():
    policy, target = random_pair(5)
    exact = kl_symmetry_alpha(policy, target)
    single = kl_symmetry_alpha(policy.float(), target.float())
    assert single.alpha.dtype == torch.float32
    assert torch.allclose(single.alpha.double(), exact.alpha, atol=1e-5)


def test_identical_distributions_give_alpha_one():
    policy = torch.randn(3, 20, dtype=torch.float64)
    result = kl_symmetry_alpha(policy, policy + 4.0)  # a logit shift leaves π unchanged
    assert torch.all(result.alpha == 1.0)
    assert not result.flagged.any() and not result.fallback.any()
    assert torch.all(result.delta.abs() <= 1e-12)


def test_root_is_found_on_the_intersection_when_masks_leave_one():
    policy, target = random_pair(6, rows=16)
    generator = torch.Generator().manual_seed(6)
    policy = policy.masked_fill(torch.rand(policy.shape, generator=generator) < 0.1, NEG_INF)
    target = target.masked_fill(torch.rand(target.shape, generator=generator) < 0.1, NEG_INF)
    result = kl_symmetry_alpha(policy, target)
    assert not result.flagged.any()
    logq = geometric_mixture_logprobs(policy, target, result.alpha)
    # q lives on the intersection, so both KLs are finite against the unmasked distributions.
    gap = kl_reference(logq, torch.log_softmax(policy, -1)) - kl_reference(
        logq, torch.log_softmax(target, -1)
    )
    assert torch.all(gap.abs() <= 1e-6)


def test_no_root_with_top_k_masks_returns_the_flagged_boundary_with_smaller_delta():
    # Row 0: the target keeps its top 2 tokens, where the policy puts little mass, so
    # log π_t - log π_θ > 0 on the whole intersection: Δ > 0 on [0, 1], best end α = 1.
    # Row 1: roles swapped, Δ < 0 on [0, 1], best end α = 0.
    top2 = torch.tensor([2.0, 1.0, NEG_INF, NEG_INF, NEG_INF], dtype=torch.float64)
    spread = torch.tensor([0.0, 1.0, 4.0, 4.0, 4.0], dtype=torch.float64)
    policy = torch.stack([spread, top2])
    target = torch.stack([top2, spread])
    result = kl_symmetry_alpha(policy, target)
    assert result.flagged.tolist() == [True, True]
    assert not result.fallback.any()
    assert result.alpha.tolist() == [1.0, 0.0]
    for row in range(2):
        at_0 = restricted_delta(policy[row], target[row], 0.0)
        at_1 = restricted_delta(policy[row], target[row], 1.0)
        assert at_0 * at_1 > 0  # no sign change: no root inside
        best_end = 1.0 if abs(at_1) <= abs(at_0) else 0.0
        assert result.alpha[row].item() == best_end
        assert result.delta[row].item() == pytest.approx(min(at_0, at_1, key=abs), rel=1e-12)


def test_disjoint_supports_fall_back_to_alpha_one():
    policy = torch.tensor([[0.0, 1.0, NEG_INF, NEG_INF]])
    target = torch.tensor([[NEG_INF, NEG_INF, 0.5, 0.0]])
    result = kl_symmetry_alpha(policy, target)
    assert result.alpha.tolist() == [1.0]
    assert result.fallback.tolist() == [True]
    assert result.flagged.tolist() == [False]
    assert math.isnan(result.delta.item())


def test_all_row_kinds_are_solved_together_in_one_batch():
    top2 = [2.0, 1.0, NEG_INF, NEG_INF, NEG_INF]
    spread = [0.0, 1.0, 4.0, 4.0, 4.0]
    policy = torch.tensor(
        [[0.3, -1.0, 2.0, 0.1, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0], spread, [0, 0, NEG_INF, 0, 0]],
        dtype=torch.float64,
    )
    target = torch.tensor(
        [[1.0, 0.5, -2.0, 0.0, 0.7], [1.0, 2.0, 3.0, 4.0, 5.0], top2, [NEG_INF, NEG_INF, 0, 1, 1]],
        dtype=torch.float64,
    )
    target[3, 3:] = NEG_INF  # row 3: supports {0,1,3,4} and {2}: disjoint
    result = kl_symmetry_alpha(policy, target)
    assert result.flagged.tolist() == [False, False, True, False]
    assert result.fallback.tolist() == [False, False, False, True]
    assert 0 < result.alpha[0] < 1 and result.alpha[1:].tolist() == [1.0, 1.0, 1.0]
    assert abs(result.delta[0].item()) <= 1e-6
    alone = kl_symmetry_alpha(policy[:1], target[:1])
    assert result.alpha[0].item() == pytest.approx(alone.alpha.item(), abs=1e-12)


def test_kl_symmetry_alpha_keeps_leading_dims():
    policy = torch.randn(2, 3, 30)
    target = torch.randn(2, 3, 30)
    result = kl_symmetry_alpha(policy, target)
    assert result.alpha.shape == result.flagged.shape == result.delta.shape == (2, 3)


# --- progress_terms / exact_progress (Theorem 1) --------------------------------------------


def log_distributions(seed: int, rows: int = 6, vocab: int = 30, alpha: float = 0.6):
    policy, target = random_pair(seed, rows=rows, vocab=vocab)
    logq = geometric_mixture_logprobs(policy, target, alpha)
    return torch.log_softmax(policy, -1), torch.log_softmax(target, -1), logq


def test_progress_terms_on_policy_closed_form():
    log_policy, log_target, _ = log_distributions(0)
    phi1, phi2 = progress_terms(log_policy, log_target, log_policy)
    ell = log_target - log_policy
    p, t = log_policy.exp(), log_target.exp()
    jeffreys = (t * ell).sum(-1) - (p * ell).sum(-1)  # KL(πt‖πθ) + KL(πθ‖πt)
    variance = (p * ell**2).sum(-1) - (p * ell).sum(-1) ** 2
    assert torch.allclose(phi1, jeffreys, atol=1e-12)
    assert torch.allclose(phi2, variance, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("custom_reward", [False, True])
def test_theorem_1_remainder_is_third_order(seed, custom_reward):
    log_policy, log_target, logq = log_distributions(seed)
    reward = torch.randn(log_policy.shape, dtype=torch.float64) if custom_reward else None
    phi1, phi2 = progress_terms(log_policy, log_target, logq, reward)

    def remainder(eta: float) -> torch.Tensor:
        exact = exact_progress(log_policy, log_target, logq, reward, eta)
        return exact - (eta * phi1 - eta**2 / 2 * phi2)

    # Halving η divides the remainder by ~8 (the O(η⁴) term shifts the ratio by O(η)).
    for eta, slack in [(0.005, 0.4), (0.0025, 0.2)]:
        ratios = remainder(eta) / remainder(eta / 2)
        assert torch.all((ratios - 8).abs() < slack), ratios
    # NOTES: the remainder's leading term is -η³κ3/6, κ3 the third central moment of g = w·r.
    g = (log_policy - logq).exp() * (log_target - log_policy if reward is None else reward)
    p = log_policy.exp()
    kappa3 = (p * (g - (p * g).sum(-1, keepdim=True)) ** 3).sum(-1)
    eta = 1e-3
    assert torch.allclose(remainder(eta), -(eta**3) * kappa3 / 6, rtol=0.05)


def test_exact_progress_matches_the_definition():
    log_policy, log_target, logq = log_distributions(3)
    eta = torch.tensor([0.5, 1.0, 2.0, 0.1, 0.0, 3.0], dtype=torch.float64)
    weight_reward = (log_policy - logq).exp() * (log_target - log_policy)
    updated = torch.log_softmax(log_policy + eta[:, None] * weight_reward, -1)
    direct = (log_target.exp() * updated).sum(-1) - (log_target.exp() * log_policy).sum(-1)
    got = exact_progress(log_policy, log_target, logq, None, eta)
    assert torch.allclose(got, direct, atol=1e-12)
    assert got[4] == 0.0


# --- snr_alpha --------------------------------------------------------------------------------


def brute_force_snr(policy, target, reward, points: int = 10001):
    """SNR on a fine grid of alpha, from the definitions alone (no alignkit.ops code):
    q ∝ π_θ^α π_t^(1-α), g = (π_θ/q)·r, Φ1 = Σ (π_t - π_θ) g, Φ2 = Var_{π_θ}[g]."""
    alpha = torch.linspace(0, 1, points, dtype=torch.float64)
    p = torch.softmax(policy.double(), -1)[:, None, :]  # [rows, 1, V]
    p_t = torch.softmax(target.double(), -1)[:, None, :]
    a = alpha[None, :, None]
    q = p**a * p_t ** (1 - a)
    q = q / q.sum(-1, keepdim=True)
    g = p / q * reward.double()[:, None, :]
    phi1 = ((p_t - p) * g).sum(-1)
    phi2 = (p * (g - (p * g).sum(-1, keepdim=True)) ** 2).sum(-1)
    snr = phi1.abs() / phi2.sqrt()
    best = snr.argmax(-1)
    return alpha[best], snr.max(-1).values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snr_alpha_matches_a_fine_brute_force_grid(seed):
    policy, target = random_pair(seed, rows=8, vocab=40)
    reward = torch.randn(policy.shape, generator=torch.Generator().manual_seed(seed + 10))
    alpha, snr = snr_alpha(policy, target, reward.double())
    brute_alpha, brute_snr = brute_force_snr(policy, target, reward.double())
    assert torch.all(snr >= brute_snr * (1 - 1e-9))
    assert torch.allclose(alpha, brute_alpha, atol=1e-4)
    assert torch.any((alpha > 0) & (alpha < 1))  # the refinement was exercised


def test_snr_alpha_with_the_seed_reward_picks_on_policy():
    # NOTES: with r = log(π_t/π_θ), max SNR over α was at α = 1 for every random pair tried.
    policy, target = random_pair(7, rows=16, vocab=50)
    alpha, snr = snr_alpha(policy, target)
    assert torch.all(alpha == 1.0)
    _, brute_snr = brute_force_snr(
        policy, target, torch.log_softmax(target, -1) - torch.log_softmax(policy, -1), 2001
    )
    assert torch.allclose(snr, brute_snr, rtol=1e-12)


def test_snr_is_zero_without_noise_and_ties_go_to_on_policy():
    # π_t = π_θ and r = log(π_t/π_θ) = 0: Φ1 = Φ2 = 0, no progress at any α.
    policy = torch.randn(2, 10, dtype=torch.float64)
    alpha, snr = snr_alpha(policy, policy.clone())
    assert torch.all(snr == 0.0) and torch.all(alpha == 1.0)
    # A constant reward is a constant g on-policy: Φ2 = 0 while Φ1 = 0 as well.
    phi1, phi2 = progress_terms(
        torch.log_softmax(policy, -1),
        torch.log_softmax(policy + torch.randn(2, 10, dtype=torch.float64), -1),
        torch.log_softmax(policy, -1),
        torch.full((2, 10), 3.0, dtype=torch.float64),
    )
    assert torch.allclose(phi2, torch.zeros(2, dtype=torch.float64), atol=1e-24)
    assert torch.allclose(phi1, torch.zeros(2, dtype=torch.float64), atol=1e-12)


def test_snr_alpha_handles_masked_and_low_precision_inputs():
    policy, target = masked_pair()
    alpha, snr = snr_alpha(policy.to(torch.bfloat16), target.to(torch.bfloat16))
    assert alpha.dtype == torch.float32 and alpha.shape == (2,)
    # The same bf16-rounded inputs in float64 give the same answer.
    alpha64, snr64 = snr_alpha(
        policy.to(torch.bfloat16).double(), target.to(torch.bfloat16).double()
    )
    assert torch.allclose(snr.double(), snr64, rtol=1e-4)
    assert torch.allclose(alpha.double(), alpha64, atol=1e-3)
    # Unmasked bf16 rows with a real signal: the float32 result is the float64 one.
    policy, target = (t.to(torch.bfloat16) for t in random_pair(3, rows=4, vocab=20))
    alpha, snr = snr_alpha(policy, target)
    alpha64, snr64 = snr_alpha(policy.double(), target.double())
    assert torch.all(snr64 > 0.1)
    assert torch.allclose(snr.double(), snr64, rtol=1e-4)
    assert torch.allclose(alpha.double(), alpha64, atol=1e-3)


# --- min_variance_proposal_logprobs / policy_gradient_variance --------------------------------


def enumerated_estimator(logp_policy, logq, scores, baseline):
    """Mean and total variance of ĝ = (π/q)(A - b)(e_y - π), y ~ q, by a loop over every y."""
    p, q = logp_policy.exp(), logq.exp()
    vocab = p.shape[-1]
    estimates = []
    for y in range(vocab):
        one_hot = torch.zeros(vocab, dtype=p.dtype)
        one_hot[y] = 1.0
        estimates.append(p[y] / q[y] * (scores[y] - baseline) * (one_hot - p))
    estimates = torch.stack(estimates)  # [V(samples), V(logits)]
    mean = (q[:, None] * estimates).sum(0)
    variance = (q * ((estimates - mean) ** 2).sum(-1)).sum()
    return mean, variance


def exact_logit_gradient(logits, scores):
    """∇_z E_softmax(z)[A] by autograd."""
    z = logits.clone().requires_grad_(True)
    (torch.softmax(z, -1) * scores).sum().backward()
    return z.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_variance_proposal_beats_on_policy_and_kl_symmetric_sampling(seed):
    generator = torch.Generator().manual_seed(seed)
    vocab = 7
    logits_policy = torch.randn(vocab, generator=generator, dtype=torch.float64) * 2
    logits_target = torch.randn(vocab, generator=generator, dtype=torch.float64) * 2
    log_policy = torch.log_softmax(logits_policy, -1)
    scores = torch.log_softmax(logits_target, -1) - log_policy  # teacher log-ratio
    baseline = float((log_policy.exp() * scores).sum())
    gradient = exact_logit_gradient(logits_policy, scores)

    alpha_kl = kl_symmetry_alpha(logits_policy, logits_target).alpha
    proposals = {
        "on_policy": log_policy,
        "alpha_kl": geometric_mixture_logprobs(logits_policy, logits_target, alpha_kl),
        "alpha_half": geometric_mixture_logprobs(logits_policy, logits_target, 0.5),
        "q_star": min_variance_proposal_logprobs(logits_policy, scores, floor=1e-12),
        "q_floor": min_variance_proposal_logprobs(logits_policy, scores, floor=0.2),
    }
    variances = {}
    for name, logq in proposals.items():
        assert torch.allclose(logq.exp().sum(), torch.ones((), dtype=torch.float64))
        mean, variance = enumerated_estimator(log_policy, logq, scores, baseline)
        assert torch.allclose(mean, gradient, atol=1e-12), name  # unbiased
        closed = policy_gradient_variance(log_policy, logq, scores)
        assert torch.allclose(closed, variance, rtol=1e-9), name
        variances[name] = float(variance)
    assert variances["q_star"] <= variances["on_policy"] * (1 + 1e-9)
    assert variances["q_star"] <= variances["alpha_kl"] * (1 + 1e-9)
    assert variances["q_star"] <= variances["alpha_half"] * (1 + 1e-9)
    # Convexity in q: the defensive mixture is never worse than on-policy.
    assert variances["q_floor"] <= variances["on_policy"] * (1 + 1e-9)
    # Cauchy-Schwarz minimum: (Σ π|A-b|‖e_y-π‖)² - ‖∇‖².
    p = log_policy.exp()
    norms = ((1 - p) ** 2 + (p**2).sum() - p**2).sqrt()
    minimum = float((p * (scores - baseline).abs() * norms).sum() ** 2 - gradient.square().sum())
    assert variances["q_star"] == pytest.approx(minimum, rel=1e-9)
    # No other proposal does better: 200 random ones.
    others = torch.distributions.Dirichlet(torch.ones(vocab, dtype=torch.float64)).sample((200,))
    other_var = policy_gradient_variance(
        log_policy.expand(200, -1), others.log(), scores.expand(200, -1), baseline
    )
    assert float(other_var.min()) >= variances["q_star"]


def test_min_variance_proposal_with_a_given_baseline_and_degenerate_rows():
    logits = torch.tensor(
        [[0.0, 1.0, NEG_INF, -1.0], [0.3, 0.3, 0.3, 0.3], [0.0, 2.0, 1.0, 0.5]], dtype=torch.float64
    )
    scores = torch.tensor(
        [[1.0, -2.0, 5.0, 0.5], [2.0, 2.0, 2.0, 2.0], [1.0, 0.0, 3.0, -1.0]], dtype=torch.float64
    )
    logq = min_variance_proposal_logprobs(
        logits, scores, baseline=torch.tensor([0.0, 2.0, 1.0]), floor=0.25
    )
    log_policy = torch.log_softmax(logits, -1)
    # Off supp π q is 0; a constant score equal to the baseline leaves only the policy.
    assert logq[0, 2] == NEG_INF
    assert torch.allclose(logq[1], log_policy[1])
    # Row 3 by hand: q* ∝ π|A - 1|‖e_y - π‖, mixed 3:1 with π.
    p = log_policy[2].exp()
    mass = p * (scores[2] - 1).abs() * ((1 - p) ** 2 + (p**2).sum() - p**2).sqrt()
    expected = 0.75 * mass / mass.sum() + 0.25 * p
    assert torch.allclose(logq[2].exp(), expected, atol=1e-14)
    assert float(logq[2].exp()[0]) == pytest.approx(0.25 * float(p[0]))  # A = b: the floor only
    # Weights π/q never exceed 1/floor.
    weights = (log_policy - logq).exp()[torch.isfinite(log_policy)]
    assert float(weights.max()) <= 4.0 + 1e-12
    with pytest.raises(ValueError, match="floor must lie in"):
        min_variance_proposal_logprobs(logits, scores, floor=0.0)
    with pytest.raises(ValueError, match="differ"):
        min_variance_proposal_logprobs(logits, scores[:, :3])


def test_policy_gradient_variance_is_infinite_when_q_misses_a_needed_token():
    log_policy = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), -1)
    scores = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    logq = torch.log(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert policy_gradient_variance(log_policy, logq, scores) == math.inf
    # On-policy, closed form: E_π[(A-b)²‖e_y-π‖²] - ‖π ⊙ (A - E_π A)‖².
    p = log_policy.exp()
    b = (p * scores).sum()
    norms_sq = (1 - p) ** 2 + (p**2).sum() - p**2
    expected = (p * (scores - b) ** 2 * norms_sq).sum() - (p * (scores - b)).square().sum()
    assert torch.allclose(policy_gradient_variance(log_policy, log_policy, scores), expected)
