"""Importance weights: correcting for tokens sampled by a behaviour distribution mu (a teacher
mixture, an inference engine in another process or precision, weights a few updates old) while
the loss is written for the trainer's distribution pi.

- :func:`truncated_importance_weights`: the per-token weights ``min(pi/mu, C)``;
- :func:`rollout_correction`: the rollout correction of an online trainer (``rollout.correction``):
  token- or sequence-level ratios, truncated or masked (TRL 1.16's
  ``vllm_importance_sampling_mode``, verl's rollout correction);
- :func:`effective_sample_size`: how far a batch of weights is from uniform.

How far the sampler is from the trainer (k1 and k3 estimates of KL(mu || pi) on the sampled
tokens) is ``ops.kl.mismatch_kl``.

**Which pi.** Under top-k/top-p the sampler draws from the *truncated* policy
``pi_trunc = softmax over the kept set`` (``ops.sampling.truncate_logits``), and an engine records
``log mu = log pi_trunc`` (vLLM with ``--logprobs-mode processed_logprobs``, alignkit's decode
loop). The target of the correction is then the trainer's own ``pi_trunc`` on the same tokens, not
the full-vocabulary ``pi``: ``pi / mu`` would be the kept mass ``S < 1`` for every token even with
identical numerics, a log-ratio off by ``log S`` (TRL's open trl#6789). The trainer scores that
target with ``models.forward.token_logprobs(..., logits_filter=truncate_logits...)``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from alignkit.ops._dtype import compute_dtype

__all__ = [
    "CORRECTION_LEVELS",
    "CORRECTION_MODES",
    "RolloutCorrection",
    "effective_sample_size",
    "rollout_correction",
    "truncated_importance_weights",
]

CORRECTION_LEVELS = ("token", "sequence")
CORRECTION_MODES = ("truncate", "mask")

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


class RolloutCorrection(NamedTuple):
    """The outcome of :func:`rollout_correction`."""

    #: ``[N, T]`` the weight of every response token (0 off the mask), detached.
    weights: Tensor
    #: ``[N, T]`` (token level) or ``[N]`` (sequence level): ``log(pi / mu)`` of each unit before
    #: the cap (clamped to +-20), for metrics.
    log_ratio: Tensor
    #: same shape as ``log_ratio``: True where the cap (or mask bounds) changed the weight.
    limited: Tensor


@torch.no_grad()
def rollout_correction(
    logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    *,
    level: Literal["token", "sequence"] = "token",
    mode: Literal["truncate", "mask"] = "truncate",
    cap: float = 2.0,
    lower: float | None = None,
) -> RolloutCorrection:
    """Importance weights of rollouts sampled by mu for a loss written for pi (detached).

    Ratios (``m_t`` the response mask):

    - ``level="token"``: ``rho_t = pi(y_t | y_<t) / mu(y_t | y_<t)``, one per token;
    - ``level="sequence"``: ``rho = prod_t rho_t = exp(sum_t m_t log rho_t)``, the same for
      every token of a sequence.

    Weights:

    - ``mode="truncate"``: ``w = min(rho, C)`` (truncated IS: Ionides 2008; Yao et al. 2025,
      "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl's
      ``rollout_is``, TRL's ``*_truncate``). Small ratios are kept as they are;
    - ``mode="mask"``: ``w = rho`` where ``lower <= rho <= C``, else 0: the token (or the whole
      sequence) leaves the loss (TRL's ``*_mask``, verl's rejection sampling ``rollout_rs``).

    Expectations under mu (exact, ``tests/ops/test_importance.py``): at sequence level
    ``E_mu[w f(y)] = sum_y min(pi(y), C mu(y)) f(y)`` (truncate) or ``sum_{y kept} pi(y) f(y)``
    (mask), so ``E_pi[f]`` exactly when no ratio reaches the bounds. At token level each
    token's conditional is corrected but its prefix stays drawn from mu: ``E_mu[w_t g(y_<=t)]
    = E_{y_<t ~ mu}[sum_{y_t} min(pi, C mu)(y_t | y_<t) g(y_<=t)]`` (lower variance, biased
    when mu and pi differ on prefixes).

    Args:
        logp: ``[N, T]`` log pi of the sampled tokens: the trainer's distribution, the one the
            tokens *should* have come from (truncated like the sampler, see the module docstring).
        behaviour_logp: ``[N, T]`` log mu of the same tokens, recorded by the engine.
        mask: ``[N, T]`` the response tokens.
        level, mode: see above.
        cap: ``C >= 1``, the upper bound (TRL: ``vllm_importance_sampling_clip_max``, default 3;
            verl: ``rollout_is_threshold``, default 2).
        lower: mask mode only: ratios below it are masked too (TRL's ``clip_min``); None: 0.

    Returns:
        :class:`RolloutCorrection`; log-ratios are clamped to +-20 before ``exp`` (verl's
        ``SAFETY_BOUND``) so padding and extreme sequences stay finite.
    """
    if level not in CORRECTION_LEVELS or mode not in CORRECTION_MODES:
        raise ValueError(
            f"level must be one of {CORRECTION_LEVELS} and mode one of {CORRECTION_MODES}, "
            f"got {level!r}, {mode!r}"
        )
    if not (math.isfinite(cap) and cap >= 1.0):
        raise ValueError(f"cap must be a finite number >= 1, got {cap}")
    if lower is not None and (mode != "mask" or not 0 <= lower < 1):
        raise ValueError(f"lower is a mask-mode bound in [0, 1), got {lower} with mode={mode}")
    if not logp.shape == behaviour_logp.shape == mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, behaviour_logp {tuple(behaviour_logp.shape)} and mask "
            f"{tuple(mask.shape)} differ"
        )
    dtype = compute_dtype(logp, behaviour_logp)
    valid = mask != 0
    token_log_ratio = torch.where(valid, logp.to(dtype) - behaviour_logp.to(dtype), 0.0)
    if level == "token":
        log_ratio = token_log_ratio.clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT)
    else:
        log_ratio = token_log_ratio.sum(dim=-1).clamp(-_MAX_LOG_WEIGHT, _MAX_LOG_WEIGHT)
    ratio = log_ratio.exp()
    if mode == "truncate":
        limited = ratio > cap
        unit_weights = ratio.clamp_max(cap)
    else:
        limited = (ratio > cap) | (ratio < (lower or 0.0))
        unit_weights = ratio.masked_fill(limited, 0.0)
    if level == "sequence":
        unit_weights = unit_weights[:, None].expand_as(token_log_ratio)
    weights = torch.where(valid, unit_weights, 0.0)
    return RolloutCorrection(weights, log_ratio, limited)
