"""The GRPO-era policy surrogates, each one registered policy loss (``ops.losses`` registry):
GSPO's sequence-level ratio (``gspo``, ``gspo_token``), CISPO's clipped stop-gradient weights
(``cispo``) and SAPO's soft gate (``sapo``). PPO's clipped loss (with dual or two-sided
clipping) and plain REINFORCE live in ``ops.losses``.

Conventions as in ``ops.losses``: ``[B, T]`` token tensors with a ``mask``, minimisation
objectives, float32 arithmetic for low-precision inputs, ``weights`` multiplied into the
per-token loss and ``agg``/``normaliser`` passed on to ``aggregate_loss``. Every loss returns
``(loss, stats)``. ``docs/migrating-from-trl.md`` maps each to TRL's and verl's options.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.ops.losses import (
    _MAX_LOG_RATIO,
    AggMode,
    _aggregate,
    _check_same_shape,
    _per_token,
    _upcast,
    _weighted,
    aggregate_loss,
    register_policy_loss,
)

__all__ = [
    "cispo_policy_loss",
    "gspo_policy_loss",
    "gspo_token_policy_loss",
    "sapo_policy_loss",
    "sequence_log_ratio",
]


def _log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return torch.clamp(logp - old_logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _inputs(logp: Tensor, old_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Float32-or-wider log-probs with 0 off the mask: padding (inf/NaN) then reaches neither
    the loss nor, through ``exp``, the gradient."""
    logp, old_logp = _upcast(logp), _upcast(old_logp)
    _check_same_shape("logp", logp, old_logp=old_logp, mask=mask)
    valid = mask.bool()
    return torch.where(valid, logp, 0.0), torch.where(valid, old_logp, 0.0)


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` mean token log-ratio of each sequence, ``log s_i = (1/|y_i|) sum_t log r_it``.

    ``s_i = exp(log s_i)`` is GSPO's sequence-level importance ratio, the geometric mean of the
    token ratios ``r_it = pi(y_it) / pi_old(y_it)`` (Zheng et al. 2025, arXiv:2507.18071, eq. 7).
    Token log-ratios are clamped to [-20, 20] as in PPO; a sequence without a valid token gets 0.
    Differentiable in `logp`.
    """
    valid = mask.bool()
    summed = torch.where(valid, _log_ratio(logp, old_logp), 0.0).sum(dim=-1)
    return summed / valid.sum(dim=-1).clamp_min(1)


def _sequence_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` one advantage per sequence: as given, or the (constant) value of a ``[B, T]``
    tensor on each sequence's valid tokens; ``ValueError`` when it varies along a sequence."""
    advantages = _upcast(advantages)
    if advantages.dim() == 1:
        return advantages
    valid = mask.bool()
    high = torch.where(valid, advantages, -torch.inf).amax(dim=-1)
    low = torch.where(valid, advantages, torch.inf).amin(dim=-1)
    if bool((high > low).any()):
        raise ValueError(
            "gspo needs one advantage per sequence (an outcome estimator: grpo, dr_grpo, rloo); "
            "these advantages vary along a sequence: use gspo_token"
        )
    return torch.where(valid.any(dim=-1), high, 0.0)


def _check_clip(clip_ratio: float, clip_ratio_high: float) -> None:
    if not 0.0 < clip_ratio < 1.0 or clip_ratio_high <= 0.0:
        raise ValueError(
            f"need 0 < clip_ratio < 1 and clip_ratio_high > 0, got {clip_ratio}, {clip_ratio_high}"
        )


def _clip_stats(
    unclipped: Tensor, clipped: Tensor, log_ratio: Tensor, mask: Tensor
) -> dict[str, Tensor]:
    with torch.no_grad():
        return {
            "clipfrac": aggregate_loss((clipped > unclipped).to(unclipped.dtype), mask),
            "approx_kl": aggregate_loss(-log_ratio, mask),
        }


@register_policy_loss("gspo")
def gspo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    weights: Tensor | None = None,
    agg: AggMode | str = "seq-mean-token-mean",
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: PPO's clipped surrogate on the sequence-level ratio; ``"gspo"``.

    Zheng et al. 2025 (Group Sequence Policy Optimization, arXiv:2507.18071, eq. 5-7)::

        s_i  = exp((1/|y_i|) sum_t log(pi(y_it) / pi_old(y_it)))     # sequence_log_ratio
        l_i  = max(-A_i * s_i, -A_i * clamp(s_i, 1 - eps_low, 1 + eps_high))

    clipped per sequence: a sequence is either inside the trust region or not, whatever its
    single tokens do. ``l_i`` is placed on each of the sequence's tokens and aggregated with
    `agg`: the paper's ``mean_i l_i`` is ``"seq-mean-token-mean"`` (the default here, and
    TRL's ``importance_sampling_level="sequence"`` with ``loss_type="grpo"``); other modes
    weigh sequences by their length. The gradient of ``s_i`` is ``s_i * mean_t grad log pi``,
    so with per-sequence advantages this equals ``gspo_token`` (tested).

    The paper's clip range is ``(3e-4, 4e-4)`` (the defaults): a sequence ratio is a geometric
    mean and moves far less than token ratios.

    Args:
        logp, old_logp: ``[B, T]`` log-probs under the current and the sampling policy.
        advantages: ``[B]``, or ``[B, T]`` constant along each sequence (``ValueError``
            otherwise: use ``gspo_token`` for token-level advantages).
        mask: ``[B, T]`` the tokens of each sequence (the ratio's mean is over them).
        clip_ratio, clip_ratio_high: ``eps_low`` in (0, 1) and ``eps_high`` > 0.
        weights, agg, normaliser: as ``ppo_policy_loss``.

    Returns:
        ``(loss, stats)``; stats ``clipfrac`` (token share of clipped sequences) and
        ``approx_kl`` (token mean of ``old_logp - logp``).
    """
    _check_clip(clip_ratio, clip_ratio_high)
    logp, old_logp = _inputs(logp, old_logp, mask)
    seq_advantages = _sequence_advantages(advantages, mask)
    ratio = torch.exp(sequence_log_ratio(logp, old_logp, mask))
    unclipped = -seq_advantages * ratio
    clipped = -seq_advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio_high)
    per_sequence = torch.maximum(unclipped, clipped)
    per_token = per_sequence[:, None].expand_as(logp)
    stats = _clip_stats(
        unclipped[:, None].expand_as(logp),
        clipped[:, None].expand_as(logp),
        _log_ratio(logp, old_logp),
        mask,
    )
    return _aggregate(_weighted(per_token, weights), mask, agg, normaliser), stats


@register_policy_loss("gspo_token")
def gspo_token_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    weights: Tensor | None = None,
    agg: AggMode | str = "seq-mean-token-mean",
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token: the sequence ratio's value with one token's gradient; ``"gspo_token"``.

    Zheng et al. 2025 (arXiv:2507.18071, eq. 13-14), verl's ``policy_loss.loss_mode=gspo``::

        s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]          # value s_i, gradient s_i grad log pi_t
        l_it = max(-A_it * s_it, -A_it * clamp(s_it, 1 - eps_low, 1 + eps_high))

    for token-level advantages ``A_it`` (multi-turn, a critic). With ``A_it = A_i`` it equals
    ``gspo`` in value and gradient. Arguments and statistics as ``gspo_policy_loss``;
    `advantages` may be ``[B]`` or ``[B, T]``.
    """
    _check_clip(clip_ratio, clip_ratio_high)
    logp, old_logp = _inputs(logp, old_logp, mask)
    advantages = _per_token(advantages, logp)
    log_s = sequence_log_ratio(logp, old_logp, mask).detach()
    ratio = torch.exp(logp - logp.detach() + log_s[:, None])
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio_high)
    per_token = torch.maximum(unclipped, clipped)
    stats = _clip_stats(unclipped, clipped, _log_ratio(logp, old_logp), mask)
    return _aggregate(_weighted(per_token, weights), mask, agg, normaliser), stats


@register_policy_loss("cispo")
def cispo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: float | None = None,
    clip_ratio_high: float = 4.0,
    weights: Tensor | None = None,
    agg: AggMode | str = "token-mean",
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: REINFORCE with clipped, stop-gradient importance weights; ``"cispo"``.

    MiniMax-M1 (arXiv:2506.13585, eq. 4-5)::

        w_t = sg[clamp(r_t, 1 - eps_low, 1 + eps_high)],   r_t = pi(y_t) / pi_old(y_t)
        l_t = -w_t * A_t * log pi(y_t)

    Unlike PPO's clip, no token loses its gradient: a clipped ratio only bounds the token's
    weight. The paper sets no lower bound in practice (``clip_ratio=None``, the default, as
    TRL); ``clip_ratio_high=4.0`` caps the weight at 5 (ScaleRL's ``eps_max = 5``,
    arXiv:2510.13786). TRL's ``epsilon_high`` is that cap itself (``epsilon_high=5.0`` here is
    ``clip_ratio_high=4.0``); verl clamps to ``[1 - clip_ratio_low, 1 + clip_ratio_high]``.
    The loss's value is REINFORCE's (``-w A log pi``), not a surrogate near 0.

    Args:
        clip_ratio: ``eps_low`` in (0, 1), or None for no lower bound.
        clip_ratio_high: ``eps_high`` > 0.
        Others as ``ppo_policy_loss``.

    Returns:
        ``(loss, stats)``: ``clipfrac`` (token share whose weight was clipped) and ``approx_kl``.
    """
    if clip_ratio is not None and not 0.0 < clip_ratio < 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1) or None, got {clip_ratio}")
    if clip_ratio_high <= 0.0:
        raise ValueError(f"clip_ratio_high must be > 0, got {clip_ratio_high}")
    logp, old_logp = _inputs(logp, old_logp, mask)
    log_ratio = _log_ratio(logp, old_logp)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        low = None if clip_ratio is None else 1.0 - clip_ratio
        weight = torch.clamp(ratio, min=low, max=1.0 + clip_ratio_high)
        stats = {
            "clipfrac": aggregate_loss((weight != ratio).to(logp.dtype), mask),
            "approx_kl": aggregate_loss(-log_ratio, mask),
        }
    per_token = -weight * _per_token(advantages, logp) * logp
    return _aggregate(_weighted(per_token, weights), mask, agg, normaliser), stats


@register_policy_loss("sapo")
def sapo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    weights: Tensor | None = None,
    agg: AggMode | str = "seq-mean-token-mean",
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO: a smooth, temperature-controlled gate in place of the hard clip; ``"sapo"``.

    Gao et al. 2025 (Soft Adaptive Policy Optimization, arXiv:2511.20347, eq. 5-7)::

        f_tau(r) = sigmoid(tau * (r - 1)) * 4 / tau,     tau = tau_pos if A_t > 0 else tau_neg
        l_t      = -f_tau(r_t) * A_t

    ``f'(1) = 1``: on-policy the gradient is the policy gradient; as ``r`` leaves 1 the gate's
    slope ``4 s (1 - s) r`` decays smoothly instead of dropping to 0 at a clip edge, faster for
    negative advantages (``tau_neg > tau_pos``). The paper averages per sequence, as GRPO:
    ``agg="seq-mean-token-mean"`` by default (verl forces it; TRL's ``loss_type="sapo"``
    uses it). The definition is unambiguous and TRL's and verl's code agree with it (tested).

    Args:
        tau_pos, tau_neg: gate temperatures > 0 (the paper's 1.0 and 1.05).
        Others as ``ppo_policy_loss``.

    Returns:
        ``(loss, stats)``: ``approx_kl``, and ``gate_mean`` (token mean of ``f(r) / f(1)``).
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos}, {tau_neg}")
    logp, old_logp = _inputs(logp, old_logp, mask)
    advantages = _per_token(advantages, logp)
    log_ratio = _log_ratio(logp, old_logp)
    tau = torch.where(advantages > 0, tau_pos, tau_neg).to(logp.dtype)
    gate = torch.sigmoid(tau * (torch.exp(log_ratio) - 1.0)) * 4.0 / tau
    per_token = -gate * advantages
    with torch.no_grad():
        stats = {
            "approx_kl": aggregate_loss(-log_ratio, mask),
            "gate_mean": aggregate_loss(gate * tau / 2.0, mask),
        }
    return _aggregate(_weighted(per_token, weights), mask, agg, normaliser), stats
