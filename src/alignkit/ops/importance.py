"""Importance weights: correcting for tokens sampled by a behaviour distribution mu (a teacher
mixture, a truncated sampler, an inference engine, an older policy) while the loss is written
for pi.

:func:`truncated_importance_weights` gives the per-token weights ``min(pi/mu, C)``;
:func:`effective_sample_size` summarises how far a batch of weights is from uniform.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from alignkit.ops._dtype import compute_dtype

__all__ = ["effective_sample_size", "truncated_importance_weights"]

# exp(20) ~ 4.9e8: never binds below any sensible cap, and keeps exp() finite.
_MAX_LOG_WEIGHT = 20.0


@torch.no_grad()
def truncated_importance_weights(logp: Tensor, behaviour_logp: Tensor, max_weight: float) -> Tensor:
    """Per-token truncated importance weights ``w_t = min(pi(y_t) / mu(y_t), C)``, detached.

    ``w = min(exp(logp - behaviour_logp), max_weight)``: tokens y_t were sampled from the
    behaviour policy mu, the loss is for pi; multiplying each token's loss by w corrects the
    expectation (exactly when the cap never binds). Truncation is one-sided, as in verl's TIS
    (``rollout_corr_helper``, default cap 2; Yao et al. 2025, "Your Efficient RL Framework
    Secretly Brings You Off-Policy RL Training"), following truncated importance sampling
    (Ionides 2008) and the decoupled behaviour/proximal policies of Hilton et al. 2022
    (arXiv:2110.00641): large weights are capped (bounded variance, some bias), small weights are
    kept (OpenRLHF's ``[0.5, 5]`` clamp would also *raise* them). For the PPO case, pass
    ``logp = old_logp`` (the trainer's recomputed pi_old) and ``behaviour_logp`` = the
    sampler's log-probs: the weights then multiply the per-token PPO loss (``weights=``).

    Args:
        logp: ``[...]`` log pi(y_t) (gradient is not propagated: the result is detached).
        behaviour_logp: ``[...]`` log mu(y_t) of the same tokens, recorded at sampling time.
        max_weight: the cap C >= 1 (C < 1 would down-weight even on-policy tokens).

    Returns:
        ``[...]`` weights in [0, C], float32 (float64 for float64 inputs), not masked. The
        log-ratio is clamped to +-20 before ``exp`` so that padding cannot overflow.
    """
    if not (math.isfinite(max_weight) and max_weight >= 1.0):
        raise ValueError(f"max_weight must be a finite number >= 1, got {max_weight}")
    if logp.shape != behaviour_logp.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)} and behaviour_logp {tuple(behaviour_logp.shape)} differ"
        )
    dtype = compute_dtype(logp, behaviour_logp)
    log_weight = (logp.to(dtype) - behaviour_logp.to(dtype)).clamp(
        -_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT
    )
    return log_weight.exp().clamp_max(max_weight)


@torch.no_grad()
def effective_sample_size(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of importance weights (0-d).

    Equals the number of weights when they are all equal, and 1 when one weight dominates;
    divide by the count for a fraction in (0, 1]. Over the entries where ``mask`` is nonzero
    (all when None); 0 when no weight is nonzero. Kish 1965, "Survey Sampling".
    """
    w = weights.to(compute_dtype(weights))
    if mask is not None:
        if mask.shape != weights.shape:
            raise ValueError(f"mask {tuple(mask.shape)} and weights {tuple(weights.shape)} differ")
        w = torch.where(mask != 0, w, 0.0)
    squares = w.square().sum()
    return torch.where(squares > 0, w.sum().square() / torch.where(squares > 0, squares, 1), 0.0)
