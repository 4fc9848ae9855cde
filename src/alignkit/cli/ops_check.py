"""The identities `alignkit ops-check` runs (the command is `alignkit.cli.checks`): a few
identities of `alignkit.ops` on random data, printed as a table.

A quick way to trust an install (or a new GPU/dtype): each row states a formula, the value the
library computes, the value it must equal (closed form or an independent computation), and
whether they agree within the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CheckResult:
    """One identity: what was computed, what it must equal, and whether it does."""

    formula: str
    value: float
    expected: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.value) and abs(self.value - self.expected) <= self.tolerance


def _selective_log_softmax(gen: torch.Generator) -> CheckResult:
    from alignkit.ops.logprobs import selective_log_softmax

    logits = torch.randn(4, 16, 1000, generator=gen)
    index = torch.randint(0, 1000, (4, 16), generator=gen)
    naive = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    err = (selective_log_softmax(logits, index) - naive).abs().max().item()
    return CheckResult("selective_log_softmax = log_softmax.gather (max |diff|)", err, 0.0, 1e-5)


def _kl_estimators(gen: torch.Generator) -> list[CheckResult]:
    from alignkit.ops.kl import kl_estimate

    logits_pi = torch.randn(8, generator=gen)
    logits_ref = torch.randn(8, generator=gen)
    logp_all = torch.log_softmax(logits_pi.double(), -1)
    ref_all = torch.log_softmax(logits_ref.double(), -1)
    exact = (logp_all.exp() * (logp_all - ref_all)).sum().item()
    n = 400_000
    tokens = torch.multinomial(logp_all.exp(), n, replacement=True, generator=gen)
    logp, ref = logp_all[tokens], ref_all[tokens]
    rows = []
    for kind in ("k1", "k3"):
        est = kl_estimate(logp, ref, kind).double()
        stderr = est.std().item() / math.sqrt(n)
        rows.append(
            CheckResult(
                f"E_pi[{kind}] = KL(pi||ref) (Monte Carlo, 5 std errors)",
                est.mean().item(),
                exact,
                5 * stderr,
            )
        )
    return rows


def _kl_loss_gradients(gen: torch.Generator) -> list[CheckResult]:
    """E_{y~pi}[grad kl_loss] in closed form (a sum over a small vocabulary, pi as the weight)
    against autograd's gradient of the exact divergence each estimator is documented to give."""
    from alignkit.ops.kl import kl_loss

    # Scale 0.5 keeps ref/pi far below 13.6, where k3's clamp at 10 would cut its gradient.
    logits = 0.5 * torch.randn(6, generator=gen, dtype=torch.float64)
    ref_logp = torch.log_softmax(0.5 * torch.randn(6, generator=gen, dtype=torch.float64), -1)

    def gradient(objective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        leaf = logits.clone().requires_grad_()
        return torch.autograd.grad(objective(torch.log_softmax(leaf, -1)), leaf)[0]

    def expected_loss_gradient(estimator: str) -> torch.Tensor:
        return gradient(
            lambda logp: (logp.detach().exp() * kl_loss(logp, ref_logp, estimator)).sum()
        )

    reverse = gradient(lambda logp: (logp.exp() * (logp - ref_logp)).sum())
    forward = gradient(lambda logp: (ref_logp.exp() * (ref_logp - logp)).sum())
    rows = []
    for estimator, target, name in [
        ("k1", torch.zeros_like(reverse), "0"),
        ("k2", reverse, "grad KL(pi||ref)"),
        ("k3", forward, "grad KL(ref||pi)"),
        ("k3+", reverse, "grad KL(pi||ref)"),
    ]:
        err = (expected_loss_gradient(estimator) - target).abs().max().item()
        rows.append(
            CheckResult(f"E_pi[grad kl_loss {estimator}] = {name} (max |diff|)", err, 0.0, 1e-9)
        )
    return rows


def _importance_weights(gen: torch.Generator) -> CheckResult:
    from alignkit.ops.importance import truncated_importance_weights

    log_pi = torch.log_softmax(torch.randn(8, generator=gen, dtype=torch.float64), -1)
    log_mu = torch.log_softmax(torch.randn(8, generator=gen, dtype=torch.float64), -1)
    f = torch.randn(8, generator=gen, dtype=torch.float64)
    weights = truncated_importance_weights(log_pi, log_mu, max_weight=1e9)
    err = abs((log_mu.exp() * weights * f).sum().item() - (log_pi.exp() * f).sum().item())
    return CheckResult("E_mu[w f] = E_pi[f] (uncapped importance weights, |diff|)", err, 0.0, 1e-12)


def _dpo(gen: torch.Generator) -> list[CheckResult]:
    from alignkit.ops.losses import dpo_loss

    logps = torch.randn(4, generator=gen)
    losses, _, _ = dpo_loss(logps, logps, logps, logps, beta=0.1, kind="sigmoid")
    rows = [
        CheckResult(
            "DPO sigmoid loss at equal log-ratios = log 2",
            losses.mean().item(),
            math.log(2.0),
            1e-6,
        )
    ]
    beta = 0.5
    hs = torch.linspace(0.0, 2.0, 2001, dtype=torch.float64)
    zeros = torch.zeros_like(hs)
    ipo, _, _ = dpo_loss(hs, zeros, zeros, zeros, beta=beta, kind="ipo")
    rows.append(
        CheckResult("argmin_h IPO loss = 1/(2 beta)", hs[ipo.argmin()].item(), 1 / (2 * beta), 1e-3)
    )
    return rows


def _gae(gen: torch.Generator) -> CheckResult:
    from alignkit.ops.advantages import gae

    rewards = torch.randn(3, 7, generator=gen)
    mask = torch.ones(3, 7)
    advantages, _ = gae(rewards, torch.zeros(3, 7), mask, gamma=1.0, lam=1.0)
    reverse_cumsum = rewards.flip(-1).cumsum(-1).flip(-1)
    err = (advantages - reverse_cumsum).abs().max().item()
    return CheckResult("GAE(gamma=1, lam=1, V=0) = reward-to-go (max |diff|)", err, 0.0, 1e-5)


def _grpo(gen: torch.Generator) -> CheckResult:
    from alignkit.ops.advantages import grpo_advantages

    scores = torch.randn(12, generator=gen)
    groups = torch.arange(3).repeat_interleave(4)
    adv = grpo_advantages(scores, groups)
    group_means = torch.zeros(3).index_add_(0, groups, adv) / 4
    return CheckResult(
        "GRPO advantages: max |group mean|", group_means.abs().max().item(), 0.0, 1e-5
    )


def _lagrange() -> CheckResult:
    from alignkit.ops.lagrange import LagrangeMultiplier

    multiplier = LagrangeMultiplier(init=1.0, lr=0.05, ema=0.95)
    lam, ema = 1.0, None
    for step in range(50):
        j_c = 0.3 if step < 25 else -0.4
        multiplier.update(j_c)
        # Seed 000, written out independently: EMA seeded with the first value, log-space step.
        ema = j_c if ema is None else 0.95 * ema + 0.05 * j_c
        lam = min(max(math.exp(math.log(lam) + 0.05 * lam * ema), 1e-6), 10.0)
    return CheckResult(
        "Lagrange multiplier = seed 000 update after 50 steps", multiplier.value, lam, 1e-12
    )


def _sampling(gen: torch.Generator) -> list[CheckResult]:
    from alignkit.ops.proposals import geometric_mixture_logprobs, kl_symmetry_alpha

    policy = torch.randn(16, 50, generator=gen, dtype=torch.float64)
    target = 2 * torch.randn(16, 50, generator=gen, dtype=torch.float64)
    endpoint = geometric_mixture_logprobs(policy, target, 1.0)
    err = (endpoint - torch.log_softmax(policy, -1)).abs().max().item()
    rows = [CheckResult("geometric mixture at alpha=1 = policy (max |diff|)", err, 0.0, 1e-12)]

    alpha = kl_symmetry_alpha(policy, target).alpha
    log_q = geometric_mixture_logprobs(policy, target, alpha)
    q = log_q.exp()
    kl_policy = (q * (log_q - torch.log_softmax(policy, -1))).sum(-1)
    kl_target = (q * (log_q - torch.log_softmax(target, -1))).sum(-1)
    gap = (kl_policy - kl_target).abs().max().item()
    rows.append(
        CheckResult("KL(q_a||pi) = KL(q_a||pi_t) at kl_symmetry_alpha (max |diff|)", gap, 0.0, 1e-6)
    )
    return rows


def run_checks(seed: int = 0) -> list[CheckResult]:
    """Run every identity with a fixed seed and return the results in display order."""
    gen = torch.Generator().manual_seed(seed)
    steps: list[Callable[[], CheckResult | list[CheckResult]]] = [
        lambda: _selective_log_softmax(gen),
        lambda: _kl_estimators(gen),
        lambda: _kl_loss_gradients(gen),
        lambda: _importance_weights(gen),
        lambda: _dpo(gen),
        lambda: _gae(gen),
        lambda: _grpo(gen),
        _lagrange,
        lambda: _sampling(gen),
    ]
    results: list[CheckResult] = []
    for step in steps:
        out = step()
        results.extend(out if isinstance(out, list) else [out])
    return results
