"""Proposal distributions between a policy and a target (seed 001, with NOTES): the geometric
family, the rules that pick its α, the variance-optimal proposal, and the seed's progress terms.

The family is ``q_α ∝ π_θ^α · π_t^(1-α)`` for α in [0, 1]: α = 1 is the policy (on-policy),
α = 0 the target. Everything works on one distribution per row: ``[..., V]`` logits or
log-probs, with the same leading dims ``[...]`` for every per-row result. Rows are never
looped over in Python. Tokens drawn from such a proposal are corrected towards the policy by
the importance weights of :mod:`alignkit.ops.importance`.

What the seed claims and what holds (NOTES, after a numerical check):

- Theorem 1 holds: for the seed's idealised update ``π_θ'(y) ∝ π_θ(y)·exp(η·w(y)·r(y))`` with
  ``w = π_θ/q``, ``J(π_θ') - J(π_θ) = η·Φ1 - η²/2·Φ2 + O(η³)`` (:func:`progress_terms`,
  :func:`exact_progress`). That update applies ``w`` without the sampling frequency q(y); a
  real sampled learner uses proper (truncated) importance weights.
- Maximising SNR = |Φ1|/√Φ2 over α (:func:`snr_alpha`) usually picks α = 1, on-policy. The
  seed's claims that α_SNR is within 0.1 of α_KL, and of a 2-5x sample-efficiency gain over
  on-policy sampling, do not hold in general; alignkit does not rely on them.
- The KL-symmetry rule (:func:`kl_symmetry_alpha`) is sound: ``Δ(α) = E_qα[log π_t - log π_θ]
  = KL(q_α‖π_θ) - KL(q_α‖π_t)`` is non-increasing (``Δ'(α) = -Var_qα[log π_t - log π_θ]``), so
  its root is unique unless π_t = π_θ. The root is the Chernoff point,
  ``argmin_α log Σ π_θ^α π_t^(1-α)``.

Beyond the seed: the geometric family does not contain the proposal that minimises the
variance of the importance-sampled policy gradient. Given a per-token score A and a baseline b
it is ``q* ∝ π_θ·|A - b|·‖e_y - π_θ‖`` (:func:`min_variance_proposal_logprobs`, mixed with
π_θ for a floor); :func:`policy_gradient_variance` gives any proposal's exact variance.

Masked logits (top-k / top-p, ``-inf``): for 0 < α < 1, q_α lives on the intersection of the
two supports; α = 1 and α = 0 return π_θ and π_t exactly. Rows whose supports are disjoint
have no mixture: they fall back to the policy (α treated as 1); :func:`disjoint_supports`
finds them and :func:`kl_symmetry_alpha` reports them.

Precision: computations run in float64 when any input is float64, else in float32 (so
bfloat16 logits are handled in float32); results come back in that dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from alignkit.ops._dtype import compute_dtype

__all__ = [
    "SymmetryResult",
    "disjoint_supports",
    "exact_progress",
    "geometric_mixture_logprobs",
    "guarded_mixture_logprobs",
    "kl_symmetry_alpha",
    "log_ratio_scores",
    "min_variance_proposal_logprobs",
    "policy_gradient_variance",
    "progress_terms",
    "snr_alpha",
]

_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0
# Elements of one [rows, grid-chunk, V] temporary in snr_alpha (256 MB in float32).
_SNR_CHUNK_ELEMENTS = 1 << 26


class SymmetryResult(NamedTuple):
    """Per-row result of :func:`kl_symmetry_alpha`; every field has shape ``[...]``."""

    alpha: Tensor
    """α in [0, 1] with KL(q_α‖π_θ) = KL(q_α‖π_t), or the chosen boundary."""
    flagged: Tensor
    """True where Δ has no root in [0, 1] (possible only with -inf logits): boundary chosen."""
    fallback: Tensor
    """True where the supports are disjoint: no mixture exists, α = 1 (the policy)."""
    delta: Tensor
    """Residual Δ(α) = KL(q_α‖π_θ) - KL(q_α‖π_t) on the supports' intersection; NaN on
    fallback rows."""


class _Pair(NamedTuple):
    """Both log-distributions of a row, with the intersection of their supports."""

    logp_policy: Tensor  # log π_θ, -inf off its support
    logp_target: Tensor  # log π_t
    support: Tensor  # bool: π_θ > 0 and π_t > 0
    policy_on_support: Tensor  # log π_θ on the intersection, 0 elsewhere (no inf arithmetic)
    target_on_support: Tensor


def _prepare(logits_policy: Tensor, logits_target: Tensor) -> _Pair:
    if logits_policy.shape != logits_target.shape:
        raise ValueError(
            f"policy and target logits differ in shape: {tuple(logits_policy.shape)} vs "
            f"{tuple(logits_target.shape)}"
        )
    dtype = compute_dtype(logits_policy, logits_target)
    logp_policy = torch.log_softmax(logits_policy.to(dtype), dim=-1)
    logp_target = torch.log_softmax(logits_target.to(dtype), dim=-1)
    support = torch.isfinite(logp_policy) & torch.isfinite(logp_target)
    zero = logp_policy.new_zeros(())
    return _Pair(
        logp_policy,
        logp_target,
        support,
        torch.where(support, logp_policy, zero),
        torch.where(support, logp_target, zero),
    )


def _mixture(pair: _Pair, alpha: Tensor) -> Tensor:
    """log q_α for α of shape broadcastable against ``[..., V]`` (a trailing 1 for V)."""
    # log π_t + α (log π_θ - log π_t), on the intersection only: 0·(-inf) never occurs.
    mixed = pair.target_on_support + alpha * (pair.policy_on_support - pair.target_on_support)
    no_overlap = ~pair.support.any(dim=-1, keepdim=True)
    # Disjoint rows get a dummy full support so that no NaN reaches a gradient; they return
    # log π_θ below.
    mixed = mixed.masked_fill(~(pair.support | no_overlap), -math.inf)
    interior = mixed - torch.logsumexp(mixed, dim=-1, keepdim=True)
    interior = torch.where(no_overlap, pair.logp_policy, interior)
    # The endpoints are returned exactly, on their own full supports.
    return torch.where(
        alpha == 1, pair.logp_policy, torch.where(alpha == 0, pair.logp_target, interior)
    )


def _alpha_column(alpha: float | Tensor, like: Tensor) -> Tensor:
    if not isinstance(alpha, Tensor):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        return like.new_tensor(float(alpha))
    alpha = alpha.to(device=like.device, dtype=like.dtype)
    return alpha.unsqueeze(-1) if alpha.dim() > 0 else alpha


def geometric_mixture_logprobs(
    logits_policy: Tensor, logits_target: Tensor, alpha: float | Tensor
) -> Tensor:
    """Normalised ``log q_α``, ``q_α ∝ π_θ^α · π_t^(1-α)``, over the last dim.

    ``log q_α = α·log π_θ + (1-α)·log π_t - logsumexp(same)``, both inputs log-softmaxed first.
    ``alpha`` is a float or a tensor broadcastable to the leading dims ``[...]`` (values in
    [0, 1]; tensors are not checked, to avoid a device sync).

    ``-inf`` logits are allowed: for 0 < α < 1 a token outside either support gets ``-inf``;
    α = 1 returns exactly ``log π_θ`` and α = 0 exactly ``log π_t``, whatever the other has.
    Rows with disjoint supports have no interior mixture: for 0 < α < 1 they return
    ``log π_θ`` (α treated as 1). Find those rows with :func:`disjoint_supports`; they are
    also the ``fallback`` rows of :func:`kl_symmetry_alpha`. A separate function, rather than
    a tuple return, keeps the common unmasked call a plain tensor expression.

    Differentiable in the logits and in a tensor α (away from α in {0, 1}).
    """
    pair = _prepare(logits_policy, logits_target)
    return _mixture(pair, _alpha_column(alpha, pair.logp_policy))


def disjoint_supports(logits_policy: Tensor, logits_target: Tensor) -> Tensor:
    """``[...]`` bool: rows where no token has finite logits under both models."""
    both = torch.isfinite(logits_policy) & torch.isfinite(logits_target)
    return ~both.any(dim=-1)


def guarded_mixture_logprobs(
    logits_policy: Tensor, logits_target: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log q [..., V], α used [...], fallback [...])``: :func:`geometric_mixture_logprobs`
    with α set to 1 (the policy) on the rows whose supports are disjoint.

    There no interior mixture exists, and at α = 0 the mixture would be π_t itself, which puts
    all its mass where π_θ = 0 (every importance weight π_θ/q would be 0). ``alpha`` is a
    ``[...]`` tensor; the returned α is what each row used (its mean is the rollout's
    ``sampling/alpha_mean``), ``fallback`` marks the rows that fell back.
    """
    fallback = disjoint_supports(logits_policy, logits_target)
    alpha = torch.where(fallback, torch.ones_like(alpha), alpha)
    return geometric_mixture_logprobs(logits_policy, logits_target, alpha), alpha, fallback


def log_ratio_scores(
    logits_policy: Tensor, logits_target: Tensor, temperature: float = 1.0
) -> Tensor:
    """``[..., V]`` per-token scores ``A(y) = log π_t(y) - log π_θ(y)``, both ``softmax(z / T)``.

    Seed 001's reward ``r = log(π_t / π_ref)`` with π_ref = π_θ, per token: the score
    :func:`min_variance_proposal_logprobs` needs for every token before sampling. Computed from
    the untruncated distributions, so that it is finite wherever π_θ > 0 even when top-k / top-p
    truncation removes a token from π_t alone (-inf logits of both models give NaN, which the
    proposal ignores: it uses the scores on supp π_θ only).
    """
    dtype = compute_dtype(logits_policy, logits_target)
    scaled_policy = (logits_policy.to(dtype) / temperature).log_softmax(-1)
    scaled_target = (logits_target.to(dtype) / temperature).log_softmax(-1)
    return scaled_target - scaled_policy


def _delta_and_var(pair: _Pair, log_ratio: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Δ(α) = E_qα[ℓ] and Var_qα[ℓ] for α ``[..., K]``; ℓ = log π_t - log π_θ ``[..., V]``."""
    logq = pair.target_on_support.unsqueeze(-2) - alpha.unsqueeze(-1) * log_ratio.unsqueeze(-2)
    q = torch.softmax(logq.masked_fill(~pair.support.unsqueeze(-2), -math.inf), dim=-1)
    mean = (q * log_ratio.unsqueeze(-2)).sum(-1)
    var = (q * (log_ratio.unsqueeze(-2) - mean.unsqueeze(-1)) ** 2).sum(-1)
    return mean, var


@torch.no_grad()
def kl_symmetry_alpha(
    logits_policy: Tensor, logits_target: Tensor, tol: float = 1e-6, max_iter: int = 100
) -> SymmetryResult:
    """Per-row α with ``KL(q_α‖π_θ) = KL(q_α‖π_t)`` (seed 001, Theorem 4; NOTES).

    Solves ``Δ(α) = E_qα[log π_t - log π_θ] = 0``. Δ is non-increasing in α
    (``Δ' = -Var_qα``), with ``Δ(0) = KL(π_t‖π_θ) ≥ 0`` and ``Δ(1) = -KL(π_θ‖π_t) ≤ 0`` on full
    supports, so the root is bracketed by [0, 1]. All rows are solved at once by a
    safeguarded Newton iteration (Newton steps inside the bracket, bisection when a step
    leaves it or stops shrinking), from the regula-falsi point of the two ends; it stops
    when every row has ``|Δ| <= tol`` (``tol`` is in nats: the difference of the two KLs) or
    α no longer moves at working precision, at most ``max_iter`` iterations.

    Special rows:

    - ``|Δ(1)| <= tol``, including π_t = π_θ (Δ ≡ 0, every α gives the same q): α = 1;
      otherwise ``|Δ(0)| <= tol``: α = 0.
    - ``-inf`` logits: ℓ and q_α live on the supports' intersection (Δ at 0 and 1 is taken
      there too), and Δ may keep one sign on [0, 1]. Then the end with the smaller ``|Δ|``
      (1 on a tie) is returned and ``flagged`` is set. Note that ``q_α`` at a returned
      boundary (:func:`geometric_mixture_logprobs` at α = 0 or 1) is the full π_t or π_θ.
    - disjoint supports: α = 1, ``fallback`` set, ``delta`` NaN.

    α is per row. Applied per token, it gives a proposal that is KL-symmetric at each
    position, not the sequence-level geometric mixture q_α of whole responses.
    Not differentiable (runs under ``no_grad``).
    """
    if tol <= 0 or max_iter < 0:
        raise ValueError(f"need tol > 0 and max_iter >= 0, got tol={tol}, max_iter={max_iter}")
    pair = _prepare(logits_policy, logits_target)
    fallback = ~pair.support.any(dim=-1)
    # Disjoint rows get a harmless full support (ℓ = 0 there) so that nothing below is NaN.
    pair = pair._replace(support=pair.support | fallback.unsqueeze(-1))
    log_ratio = pair.target_on_support - pair.policy_on_support
    dtype, device = log_ratio.dtype, log_ratio.device
    eps = torch.finfo(dtype).eps

    ends = torch.tensor([0.0, 1.0], dtype=dtype, device=device).expand(*fallback.shape, 2)
    delta_ends, _ = _delta_and_var(pair, log_ratio, ends)
    d0, d1 = delta_ends.unbind(-1)
    root_at_1 = d1.abs() <= tol
    root_at_0 = (d0.abs() <= tol) & ~root_at_1
    bracketed = (d0 > 0) & (d1 < 0) & ~root_at_1 & ~root_at_0
    flagged = ~(bracketed | root_at_0 | root_at_1 | fallback)

    one = torch.ones_like(d0)
    boundary = torch.where(d1.abs() <= d0.abs(), one, torch.zeros_like(d0))
    regula_falsi = (d0 / torch.where(bracketed, d0 - d1, one)).clamp(0.0, 1.0)
    alpha = torch.where(bracketed, regula_falsi, torch.where(root_at_0, 0.0 * one, boundary))
    alpha = torch.where(fallback | root_at_1, one, alpha)

    lo, hi = torch.zeros_like(d0), one.clone()
    step, step_before = one.clone(), one.clone()
    best_alpha, best_delta = alpha.clone(), torch.full_like(d0, math.inf)
    done = ~bracketed
    for _ in range(max_iter):
        if bool(done.all()):
            break
        delta, var = (t.squeeze(-1) for t in _delta_and_var(pair, log_ratio, alpha.unsqueeze(-1)))
        active = ~done
        improved = active & (delta.abs() < best_delta.abs())
        best_alpha = torch.where(improved, alpha, best_alpha)
        best_delta = torch.where(improved, delta, best_delta)
        lo = torch.where(active & (delta > 0), alpha, lo)
        hi = torch.where(active & (delta < 0), alpha, hi)
        newton_step = delta / var  # α - Δ/Δ' with Δ' = -Var
        newton = alpha + newton_step
        # Newton-Raphson's rtsafe safeguard: bisect when Newton leaves the bracket or its step
        # is not at least halving compared with the step before last.
        use_newton = (newton > lo) & (newton < hi) & (2 * newton_step.abs() <= step_before.abs())
        new_step = torch.where(use_newton, newton_step, 0.5 * (lo + hi) - alpha)
        step_before, step = step, new_step
        converged = (delta.abs() <= tol) | (new_step.abs() <= 4 * eps) | (hi - lo <= 4 * eps)
        # A row that converges still takes this last step (free: Δ and Var are computed):
        # from |Δ| <= tol Newton usually lands orders of magnitude closer. The check after
        # the loop keeps whichever evaluated α has the smaller |Δ|.
        alpha = torch.where(active, alpha + new_step, alpha)
        done = done | converged

    delta = _delta_and_var(pair, log_ratio, alpha.unsqueeze(-1))[0].squeeze(-1)
    use_best = bracketed & (best_delta.abs() < delta.abs())
    alpha = torch.where(use_best, best_alpha, alpha)
    delta = torch.where(use_best, best_delta, delta).masked_fill(fallback, math.nan)
    return SymmetryResult(alpha, flagged, fallback, delta)


def _weighted_reward(
    logp_policy: Tensor, logp_target: Tensor, logq: Tensor, reward: Tensor | None
) -> Tensor:
    """g = w·r with w = π_θ/q; 0 where π_θ = 0 (those tokens cannot move under the update)."""
    on_policy = torch.isfinite(logp_policy)
    if reward is None:
        reward = logp_target - logp_policy
    zero = logp_policy.new_zeros(())
    weight = torch.exp(torch.where(on_policy, logp_policy - logq, zero))
    return torch.where(on_policy, weight * torch.where(on_policy, reward, zero), zero)


def _as_dtype(*tensors: Tensor | None) -> list[Tensor | None]:
    dtype = compute_dtype(*tensors)
    return [None if t is None else t.to(dtype) for t in tensors]


def progress_terms(
    logp_policy: Tensor, logp_target: Tensor, logq: Tensor, reward: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Signal Φ1 and noise Φ2 of seed 001's Theorem 1, per row (last dim = tokens).

    With ``w = π_θ/q`` and ``g = w·r``::

        Φ1 = Σ_y (π_t(y) - π_θ(y)) · g(y)        Φ2 = Var_{π_θ}[g]

    so that ``J(π_θ') - J(π_θ) = η·Φ1 - η²/2·Φ2 + O(η³)`` for the update
    ``π_θ' ∝ π_θ·exp(η·g)`` and ``J(π) = Σ π_t log π`` (:func:`exact_progress`).

    Inputs are normalised log-probs ``[..., V]`` (e.g. from :func:`geometric_mixture_logprobs`
    for ``logq``). ``reward`` ``[..., V]`` defaults (``None``) to the seed's
    ``r = log(π_t/π_ref)`` with ``π_ref = π_θ``, i.e. ``log π_t - log π_θ``. Tokens with
    π_θ = 0 get g = 0. The terms are finite only when q > 0 and r is finite wherever π_θ > 0.
    """
    logp_policy, logp_target, logq, reward = _as_dtype(logp_policy, logp_target, logq, reward)
    g = _weighted_reward(logp_policy, logp_target, logq, reward)
    p_policy, p_target = logp_policy.exp(), logp_target.exp()
    phi1 = ((p_target - p_policy) * g).sum(-1)
    mean_g = (p_policy * g).sum(-1, keepdim=True)
    phi2 = (p_policy * (g - mean_g) ** 2).sum(-1)
    return phi1, phi2


def exact_progress(
    logp_policy: Tensor,
    logp_target: Tensor,
    logq: Tensor,
    reward: Tensor | None,
    eta: float | Tensor,
) -> Tensor:
    """``J(π_θ') - J(π_θ)`` exactly, for ``π_θ'(y) ∝ π_θ(y)·exp(η·w(y)·r(y))``, per row.

    ``J(π) = Σ_y π_t(y) log π(y)``; arguments as in :func:`progress_terms` (``reward=None``
    is ``log π_t - log π_θ``), ``eta`` a float or a tensor broadcastable to ``[...]``.
    Computed as ``Σ π_t·(log π_θ' - log π_θ)`` with ``log π_θ' - log π_θ = η·g - log Z``
    (no cancellation between the large ``log π`` terms). Where π_t puts mass outside
    supp π_θ, J is -inf and those tokens contribute their termwise ``-log Z``.
    """
    logp_policy, logp_target, logq, reward = _as_dtype(logp_policy, logp_target, logq, reward)
    g = _weighted_reward(logp_policy, logp_target, logq, reward)
    eta_col = _eta_column(eta, g)
    centred = g - (logp_policy.exp() * g).sum(-1, keepdim=True)
    log_z = torch.logsumexp(logp_policy + eta_col * centred, dim=-1, keepdim=True)
    return (logp_target.exp() * (eta_col * centred - log_z)).sum(-1)


def _eta_column(eta: float | Tensor, like: Tensor) -> Tensor:
    if not isinstance(eta, Tensor):
        return like.new_tensor(float(eta))
    eta = eta.to(device=like.device, dtype=like.dtype)
    return eta.unsqueeze(-1) if eta.dim() > 0 else eta


def _snr(phi1: Tensor, phi2: Tensor) -> Tensor:
    # Φ2 = 0 means g is constant on supp π_θ: the update leaves π_θ unchanged, so there is no
    # progress at any order and SNR is 0 (not inf). Unbounded weights (Φ non-finite): also 0.
    ratio = phi1.abs() / phi2.clamp_min(0).sqrt()
    return torch.where((phi2 > 0) & torch.isfinite(ratio), ratio, torch.zeros_like(ratio))


@torch.no_grad()
def snr_alpha(
    logits_policy: Tensor,
    logits_target: Tensor,
    reward: Tensor | None = None,
    grid: int = 65,
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Per-row ``argmax_α SNR(q_α)`` over [0, 1], ``SNR = |Φ1| / √Φ2`` (seed 001, §5.1).

    Returns ``(alpha, snr)``, both ``[...]``. SNR(α) is not always unimodal, so it is
    evaluated on a uniform grid of ``grid`` points (all rows and points at once), then refined
    by golden-section search on the two grid cells around the best point down to ``tol`` in
    α; the refined point is kept only if it beats the grid's best. Ties go to the larger α.

    ``reward`` ``[..., V]`` as in :func:`progress_terms` (``None``: ``log π_t - log π_θ``).
    SNR is 0 where Φ2 = 0 (the update would not change π_θ) or the terms are not finite
    (q_α misses part of supp π_θ, e.g. with -inf logits).

    Expect α = 1 (on-policy) for most rows: the numerical check in NOTES found it for every
    random pair tried. The seed's claims that α_SNR is close to the KL-symmetric α and that
    q_α is 2-5x more sample-efficient than on-policy sampling do not hold in general.
    """
    if grid < 2 or tol <= 0:
        raise ValueError(f"need grid >= 2 and tol > 0, got grid={grid}, tol={tol}")
    pair = _prepare(logits_policy, logits_target)
    if reward is not None:
        reward = reward.to(pair.logp_policy.dtype)
    rows_shape = pair.logp_policy.shape[:-1]
    num_rows = max(1, math.prod(rows_shape))
    vocab = pair.logp_policy.shape[-1]

    def snr_at(alpha: Tensor) -> Tensor:  # [..., K] -> [..., K]
        expanded = _Pair(*(t.unsqueeze(-2) for t in pair))
        logq = _mixture(expanded, alpha.unsqueeze(-1))
        r = None if reward is None else reward.unsqueeze(-2)
        phi1, phi2 = progress_terms(expanded.logp_policy, expanded.logp_target, logq, r)
        return _snr(phi1, phi2)

    points = torch.linspace(
        0.0, 1.0, grid, dtype=pair.logp_policy.dtype, device=pair.logp_policy.device
    )
    chunk = max(1, _SNR_CHUNK_ELEMENTS // (num_rows * vocab))
    grid_snr = torch.cat(
        [snr_at(part.expand(*rows_shape, -1)) for part in points.split(chunk)], dim=-1
    )
    # argmax returns the first maximum: flip so that ties go to the larger α.
    best = grid - 1 - grid_snr.flip(-1).argmax(dim=-1)
    best_alpha, best_snr = points[best], grid_snr.gather(-1, best.unsqueeze(-1)).squeeze(-1)

    spacing = 1.0 / (grid - 1)
    lo = (best_alpha - spacing).clamp_min(0.0)
    hi = (best_alpha + spacing).clamp_max(1.0)
    left = hi - _INV_PHI * (hi - lo)
    right = lo + _INV_PHI * (hi - lo)
    f_left, f_right = snr_at(torch.stack([left, right], dim=-1)).unbind(-1)
    iterations = max(0, math.ceil(math.log(2 * spacing / tol) / -math.log(_INV_PHI)))
    for _ in range(iterations):
        go_left = f_left > f_right
        hi = torch.where(go_left, right, hi)
        lo = torch.where(go_left, lo, left)
        keep = torch.where(go_left, left, right)
        keep_f = torch.where(go_left, f_left, f_right)
        new = torch.where(go_left, hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo))
        f_new = snr_at(new.unsqueeze(-1)).squeeze(-1)
        left = torch.where(go_left, new, keep)
        right = torch.where(go_left, keep, new)
        f_left = torch.where(go_left, f_new, keep_f)
        f_right = torch.where(go_left, keep_f, f_new)
    refined = 0.5 * (lo + hi)
    refined_snr = snr_at(refined.unsqueeze(-1)).squeeze(-1)
    better = refined_snr > best_snr
    return torch.where(better, refined, best_alpha), torch.where(better, refined_snr, best_snr)


# --- Beyond the seed: the variance-optimal proposal ------------------------------------------


def _score_terms(logp_policy: Tensor, scores: Tensor, baseline: Tensor | None) -> tuple:
    """π, centred scores ``A - b`` (0 off supp π) and ``‖e_y - π‖²`` per token."""
    logp_policy, scores = _as_dtype(logp_policy, scores)
    p = logp_policy.exp()
    on_support = p > 0
    scores = torch.where(on_support, scores, torch.zeros_like(scores))
    if baseline is None:
        baseline = (p * scores).sum(-1, keepdim=True)
    else:
        baseline = baseline.to(p.dtype)
        baseline = baseline.unsqueeze(-1) if baseline.dim() > 0 else baseline
    centred = torch.where(on_support, scores - baseline, torch.zeros_like(scores))
    # ‖e_y - π‖² = (1 - π_y)² + Σ_{y'≠y} π_y'², written without the cancellation of
    # 1 - 2π_y + Σπ² when π_y is close to 1.
    squares = p.square()
    norm_sq = (1 - p).square() + (squares.sum(-1, keepdim=True) - squares).clamp_min(0)
    return p, centred, norm_sq


def min_variance_proposal_logprobs(
    logits_policy: Tensor,
    scores: Tensor,
    baseline: Tensor | float | None = None,
    floor: float = 0.1,
) -> Tensor:
    """``log q`` of the importance-sampling proposal that minimises the policy gradient's variance.

    Setting (one position): logits z, ``π = softmax(z)``, a score ``A(y)`` known for every
    token (e.g. the teacher log-ratio ``log π_t(y) - log π_ref(y)``) and a constant baseline b.
    The gradient ``∇_z E_π[A] = Σ_y π(y)(A(y) - b)(e_y - π)`` (any b: ``Σ π (e_y - π) = 0``)
    is estimated from one token ``y ~ q`` by ``ĝ = (π(y)/q(y))·(A(y) - b)·(e_y - π)``,
    unbiased whenever q > 0 where ``π·(A - b) ≠ 0``. Its total variance is

        tr Cov_q[ĝ] = Σ_y π(y)²(A(y) - b)²‖e_y - π‖² / q(y)  -  ‖∇_z E_π[A]‖²,

    and by Cauchy-Schwarz (``Σ c_y²/q_y ≥ (Σ c_y)²`` on the simplex) it is minimised by

        q*(y) ∝ π(y)·|A(y) - b|·‖e_y - π‖,   ‖e_y - π‖² = 1 - 2π(y) + Σ_y' π(y')²

    (``∇_z log softmax(z)_y = e_y - π``), the optimal importance density for a vector
    integrand (Kahn & Marshall 1953; Owen, "Monte Carlo theory, methods and examples", ch. 9).
    Returned is the defensive mixture ``q = (1 - floor)·q* + floor·π`` (Hesterberg 1995): it
    keeps every token of supp π (q* drops tokens with ``A = b``), bounds the importance weight
    ``π/q`` by ``1/floor``, and, the variance being convex in q, is never worse than
    on-policy sampling.

    Assumptions, stated because they limit what "optimal" means:

    - the parameters are the logits of this one position; through a network the gradient is
      ``J_zᵀ(e_y - π)`` and ``‖e_y - π‖`` is a proxy for its norm;
    - the criterion is the trace of the covariance (the sum of per-logit variances);
    - ``A(y)`` is known for every token before sampling: true for per-token scores such as the
      teacher log-ratio; a sequence-level reward's per-token advantage is only known after the
      rollout, so there q* can be applied only with such a per-token proxy score;
    - b is fixed (default ``E_π[A]``, the position's value); the jointly optimal (q, b) is not
      sought.

    Args:
        logits_policy: ``[..., V]`` policy logits (``-inf`` allowed: q is 0 off supp π).
        scores: ``[..., V]`` A(y) per token; only its values on supp π are used.
        baseline: ``[...]`` tensor or float b; ``None`` is ``E_π[A]``.
        floor: share of π in the returned mixture, in (0, 1] (1 returns π).

    Returns:
        ``[..., V]`` normalised ``log q``. Rows where q* has no mass (``A ≡ b`` on supp π, or
        π one-hot) get ``log π``.
    """
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor must lie in (0, 1], got {floor}")
    if logits_policy.shape != scores.shape:
        raise ValueError(
            f"logits {tuple(logits_policy.shape)} and scores {tuple(scores.shape)} differ"
        )
    logp_policy = torch.log_softmax(logits_policy.to(compute_dtype(logits_policy, scores)), -1)
    if baseline is not None and not isinstance(baseline, Tensor):
        baseline = logp_policy.new_tensor(float(baseline))
    p, centred, norm_sq = _score_terms(logp_policy, scores, baseline)
    mass = p * centred.abs() * norm_sq.sqrt()
    total = mass.sum(-1, keepdim=True)
    has_mass = total > 0
    q_star = mass / torch.where(has_mass, total, torch.ones_like(total))
    q = torch.where(has_mass, (1 - floor) * q_star + floor * p, p)
    return torch.where(p > 0, q.log(), logp_policy)


def policy_gradient_variance(
    logp_policy: Tensor, logq: Tensor, scores: Tensor, baseline: Tensor | float | None = None
) -> Tensor:
    """Exact ``tr Cov_q[ĝ]`` of the one-token importance-sampled logit gradient, per row.

    ``ĝ = (π(y)/q(y))·(A(y) - b)·(e_y - π)`` with ``y ~ q`` (see
    :func:`min_variance_proposal_logprobs`): ``Σ_y π²(A - b)²‖e_y - π‖²/q - ‖π ⊙ (A - E_π A)‖²``
    (the mean ``∇_z E_π[A] = π ⊙ (A - E_π[A])`` does not depend on b). With n samples the
    variance of their mean is this over n, so ``variance(π) / variance(q)`` is how many
    times fewer samples q needs for the same mean squared error. Infinite where q = 0 on a
    token with ``π·(A - b) ≠ 0`` (the estimator is then biased). Inputs: normalised
    ``[..., V]`` log-probs and ``[..., V]`` scores; ``baseline`` as there.
    """
    logp_policy, logq, scores = _as_dtype(logp_policy, logq, scores)
    if baseline is not None and not isinstance(baseline, Tensor):
        baseline = logp_policy.new_tensor(float(baseline))
    p, centred, norm_sq = _score_terms(logp_policy, scores, baseline)
    numerator = (p * centred).square() * norm_sq
    needed = numerator > 0
    q = logq.exp()
    second_moment = torch.where(
        needed, numerator / torch.where(needed & (q > 0), q, torch.ones_like(q)), 0.0
    )
    second_moment = torch.where(needed & (q <= 0), math.inf, second_moment).sum(-1)
    value = (p * scores.where(p > 0, 0.0)).sum(-1, keepdim=True)
    mean_sq = (p * (scores.where(p > 0, 0.0) - value)).square().sum(-1)
    return second_moment - mean_sq
