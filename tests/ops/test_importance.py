"""Importance weights, the rollout correction, the sampler/trainer mismatch and the effective
sample size (ops/importance.py)."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from alignkit.ops.importance import (
    effective_sample_size,
    rollout_correction,
    truncated_importance_weights,
)
from alignkit.ops.kl import mismatch_kl
from alignkit.ops.sampling import sampling_distribution


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


# --------------------------------------------------------------------------------------
# The rollout correction: exact expectations on a toy categorical
# --------------------------------------------------------------------------------------

K = 5  # tokens of the toy vocabulary


def _toy(seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi, log mu (both [K], float64) and a test function f over the K tokens."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(K, dtype=torch.float64, generator=generator)  # noqa: E731
    log_pi = torch.log_softmax(draw(), -1)
    log_mu = torch.log_softmax(log_pi + scale * draw(), -1)
    return log_pi, log_mu, draw()


def _expectation_under_mu(log_pi, log_mu, f, **settings) -> float:
    """E_mu[w(y) f(y)] of single-token responses, by enumerating every token."""
    mask = torch.ones(K, 1)
    result = rollout_correction(log_pi[:, None], log_mu[:, None], mask, **settings)
    return float((log_mu.exp() * result.weights[:, 0] * f).sum())


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_single_token_expectations_of_every_mode_are_the_closed_forms(level):
    log_pi, log_mu, f = _toy(0, scale=1.5)
    pi, mu = log_pi.exp(), log_mu.exp()
    ratio = pi / mu
    assert ratio.max() > 2.0 and ratio.min() < 0.5  # both bounds below bind somewhere
    cap, lower = 2.0, 0.5
    truncate = _expectation_under_mu(log_pi, log_mu, f, level=level, mode="truncate", cap=cap)
    assert truncate == pytest.approx(float((torch.minimum(pi, cap * mu) * f).sum()), abs=1e-12)
    masked = _expectation_under_mu(log_pi, log_mu, f, level=level, mode="mask", cap=cap)
    assert masked == pytest.approx(float((pi * f)[ratio <= cap].sum()), abs=1e-12)
    both = _expectation_under_mu(log_pi, log_mu, f, level=level, mode="mask", cap=cap, lower=lower)
    kept = (ratio <= cap) & (ratio >= lower)
    assert both == pytest.approx(float((pi * f)[kept].sum()), abs=1e-12)
    # A cap that never binds: E_pi[f] exactly, in both modes.
    for mode in ("truncate", "mask"):
        exact = _expectation_under_mu(log_pi, log_mu, f, level=level, mode=mode, cap=1e6)
        assert exact == pytest.approx(float((pi * f).sum()), abs=1e-12)


def _two_token_model(seed: int, scale: float):
    """pi(y1) pi(y2 | y1) and mu(y1) mu(y2 | y1) over K x K two-token responses."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)  # noqa: E731
    pi1, pi2 = draw(K).log_softmax(-1), draw(K, K).log_softmax(-1)
    mu1 = (pi1 + scale * draw(K)).log_softmax(-1)
    mu2 = (pi2 + scale * draw(K, K)).log_softmax(-1)
    pairs = torch.tensor(list(product(range(K), range(K))))
    a, b = pairs[:, 0], pairs[:, 1]
    log_pi = torch.stack([pi1[a], pi2[a, b]], dim=1)  # [K*K, 2] per-token conditionals
    log_mu = torch.stack([mu1[a], mu2[a, b]], dim=1)
    return log_pi, log_mu, pairs, draw(K * K), draw(K, K)


def test_sequence_level_corrects_whole_responses_exactly():
    log_pi, log_mu, _, f, _ = _two_token_model(1, scale=0.8)
    mask = torch.ones_like(log_pi)
    p_seq, q_seq = log_pi.sum(1).exp(), log_mu.sum(1).exp()
    ratio = p_seq / q_seq
    assert ratio.max() > 2.0
    for mode, cap, want in [
        ("truncate", 2.0, torch.minimum(p_seq, 2.0 * q_seq) * f),
        ("mask", 2.0, torch.where(ratio <= 2.0, p_seq * f, 0.0)),
        ("truncate", 1e6, p_seq * f),  # unbiased for E_pi[f] when nothing binds
    ]:
        result = rollout_correction(log_pi, log_mu, mask, level="sequence", mode=mode, cap=cap)
        assert torch.equal(result.weights[:, 0], result.weights[:, 1])  # one weight a sequence
        got = (q_seq * result.weights[:, 0] * f).sum()
        assert float(got) == pytest.approx(float(want.sum()), abs=1e-12), (mode, cap)
        assert result.limited.shape == (K * K,)


def test_token_level_corrects_each_conditional_and_leaves_the_prefix_under_mu():
    """E_mu[w_2 g(y1, y2)] = sum_{y1} mu(y1) sum_{y2} min(pi, C mu)(y2 | y1) g(y1, y2): the second
    token's distribution is corrected, the first token's is not (the bias of token-level IS)."""
    log_pi, log_mu, pairs, _, g = _two_token_model(2, scale=0.8)
    mask = torch.ones_like(log_pi)
    q_seq = log_mu.sum(1).exp()
    a, b = pairs[:, 0], pairs[:, 1]
    for cap in (1.5, 1e6):
        weights = rollout_correction(log_pi, log_mu, mask, level="token", cap=cap).weights
        got = float((q_seq * weights[:, 1] * g[a, b]).sum())
        mu1, mu2, pi2 = log_mu[:, 0].exp(), log_mu[:, 1].exp(), log_pi[:, 1].exp()
        want = float((mu1 * torch.minimum(pi2, cap * mu2) * g[a, b]).sum())
        assert got == pytest.approx(want, abs=1e-12)
    # ...which is not E_pi[g] when the first tokens' distributions differ.
    p_seq = log_pi.sum(1).exp()
    assert abs(got - float((p_seq * g[a, b]).sum())) > 1e-3


def test_truncated_sampling_is_corrected_against_the_distribution_actually_sampled():
    """trl#6789: top-k/top-p sampling draws from the truncated, renormalised policy. Weighed
    against the full-vocabulary pi (what TRL 1.16 does) every kept token gets the kept mass
    S < 1 even with identical numerics: the log-ratio is off by log S. alignkit's target is the
    trainer's truncated distribution (ops.sampling.truncate_logits), so the weights are 1 and
    E_mu[w f] is the sampler's expectation exactly; a real engine/trainer gap is still seen."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 12, dtype=torch.float64, generator=generator) * 2
    f = torch.randn(12, dtype=torch.float64, generator=generator)
    for top_k, top_p in [(4, 1.0), (0, 0.7), (6, 0.8)]:
        mu = sampling_distribution(logits.double(), 0.9, top_k, top_p)[0].double()  # the engine's
        kept = torch.isfinite(mu)
        tokens = kept.nonzero().squeeze(1)  # every token the sampler can draw
        behaviour = mu[tokens][:, None]
        mask = torch.ones_like(behaviour)
        full = torch.log_softmax(logits[0] / 0.9, -1)
        log_kept_mass = torch.logsumexp(full[kept], 0)
        sampled = sampling_distribution(logits, 0.9, top_k, top_p)[0].double()  # the trainer's
        ours = rollout_correction(sampled[tokens][:, None], behaviour, mask, cap=1e6).weights
        trl = rollout_correction(full[tokens][:, None], behaviour, mask, cap=1e6).weights
        torch.testing.assert_close(ours, torch.ones_like(ours), rtol=0, atol=1e-6)
        # float32 sampler: equal to its round-off
        torch.testing.assert_close(
            trl.log(), torch.full_like(trl, float(log_kept_mass)), rtol=0, atol=1e-6
        )
        assert float(log_kept_mass) < -0.05  # the truncation removes visible mass
        want = float((mu[tokens].exp() * f[tokens]).sum())  # E under the distribution sampled
        assert float((mu[tokens].exp() * ours[:, 0] * f[tokens]).sum()) == pytest.approx(want)
        assert float((mu[tokens].exp() * trl[:, 0] * f[tokens]).sum()) == pytest.approx(
            want * float(log_kept_mass.exp())
        )
    # An engine whose logits differ a little (another kernel, bf16): the weights correct that
    # gap exactly, E_mu[w f] = E_{pi_trunc}[f] while the kept sets agree and the cap never binds.
    engine_logits = logits + 0.05 * torch.randn(
        logits.shape, dtype=torch.float64, generator=generator
    )
    mu = sampling_distribution(engine_logits, 0.9, 4)[0].double()
    target = sampling_distribution(logits, 0.9, 4)[0].double()
    tokens = torch.isfinite(mu).nonzero().squeeze(1)
    assert torch.equal(tokens, torch.isfinite(target).nonzero().squeeze(1))
    mask = torch.ones(len(tokens), 1)
    weights = rollout_correction(target[tokens][:, None], mu[tokens][:, None], mask, cap=1e6)
    assert float(weights.weights.sub(1).abs().max()) > 1e-3
    got = float((mu[tokens].exp() * weights.weights[:, 0] * f[tokens]).sum())
    assert got == pytest.approx(float((target[tokens].exp() * f[tokens]).sum()))


def test_correction_masks_padding_and_reports_what_the_bounds_changed():
    logp = torch.tensor([[0.0, math.log(3.0), math.log(0.2), 5.0]])
    behaviour = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    truncated = rollout_correction(logp, behaviour, mask, cap=2.0)
    torch.testing.assert_close(truncated.weights, torch.tensor([[1.0, 2.0, 0.2, 0.0]]))
    assert truncated.limited.tolist() == [[False, True, False, False]]
    masked = rollout_correction(logp, behaviour, mask, mode="mask", cap=2.0, lower=0.5)
    torch.testing.assert_close(masked.weights, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert masked.limited[mask.bool()].tolist() == [False, True, True]
    sequence = rollout_correction(logp, behaviour, mask, level="sequence", cap=2.0)
    # prod over the 3 response tokens: 1 * 3 * 0.2 = 0.6 (the padding's 5.0 is not counted)
    torch.testing.assert_close(sequence.weights, torch.tensor([[0.6, 0.6, 0.6, 0.0]]))
    assert not truncated.weights.requires_grad
    with pytest.raises(ValueError, match="cap"):
        rollout_correction(logp, behaviour, mask, cap=0.9)
    with pytest.raises(ValueError, match="mask-mode"):
        rollout_correction(logp, behaviour, mask, lower=0.5)
    with pytest.raises(ValueError, match="level"):
        rollout_correction(logp, behaviour, mask, level="segment")


def test_mismatch_kl_estimates_kl_of_the_sampler_from_the_trainer():
    log_pi, log_mu, _ = _toy(4, scale=0.7)
    # Exact expectations over every token under mu: E_mu[k1] = E_mu[k3] = KL(mu || pi).
    kl = float((log_mu.exp() * (log_mu - log_pi)).sum())
    tokens = torch.arange(K)
    weights = log_mu.exp()
    for kind in ("k1", "k3"):
        per_token = torch.stack(
            [
                mismatch_kl(log_pi[t : t + 1, None], log_mu[t : t + 1, None], torch.ones(1, 1))[
                    kind
                ]
                for t in tokens
            ]
        )
        assert float((weights * per_token).sum()) == pytest.approx(kl, abs=1e-12), kind
    same = mismatch_kl(log_pi[None], log_pi[None], torch.ones(1, K))
    assert float(same["k1"]) == 0.0 and float(same["k3"]) == 0.0
    padded = mismatch_kl(
        torch.tensor([[-1.0, 9.0]]), torch.tensor([[-1.5, 0.0]]), torch.tensor([[1, 0]])
    )
    assert float(padded["k1"]) == pytest.approx(-0.5)  # the padded column does not count
