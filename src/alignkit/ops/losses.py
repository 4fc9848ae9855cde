"""Policy and value losses for online RL, and the one definition of loss aggregation.

Token quantities are ``[B, T]`` with a ``mask`` of the same shape (nonzero = response token).
Every loss here is a *minimisation* objective. Low-precision inputs (bf16/fp16) are upcast to
float32 before any arithmetic, so the returned loss is float32; float64 stays float64 (for
``gradcheck``). The preference losses (DPO family, reward models, Plackett-Luce) live in
``alignkit.ops.preference`` and are re-exported here so ``alignkit.ops.losses`` is the one place
to import a loss from. The GRPO-era policy surrogates (GSPO, GSPO-token, CISPO, SAPO) are
registered in ``alignkit.ops.surrogates``; a new policy loss is one function decorated with
``register_policy_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from alignkit.ops._dtype import at_least_float32
from alignkit.ops._registry import Registry
from alignkit.ops.preference import (
    DPO_LOSSES,
    REWARD_LOSSES,
    cost_model_loss,
    dpo_loss,
    plackett_luce_loss,
    register_dpo_loss,
    reward_model_loss,
)

__all__ = [
    "AGG_MODES",
    "DPO_LOSSES",
    "POLICY_LOSSES",
    "REWARD_LOSSES",
    "AggMode",
    "PolicyLoss",
    "aggregate_loss",
    "aggregation_units",
    "cost_model_loss",
    "dpo_loss",
    "get_policy_loss",
    "plackett_luce_loss",
    "policy_gradient_loss",
    "ppo_policy_loss",
    "register_dpo_loss",
    "register_policy_loss",
    "reward_model_loss",
    "value_loss",
]

AggMode = Literal[
    "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

# exp(20) ~ 4.9e8: large enough never to bind in a healthy run, small enough that a diverged
# policy (or garbage at a padded position) cannot overflow the ratio to inf and poison the grads.
_MAX_LOG_RATIO = 20.0


_upcast = at_least_float32

PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]
"""``fn(logp, old_logp, advantages, mask, *, weights=None, agg="token-mean", normaliser=None,
**settings) -> (loss, stats)``: a 0-d loss and detached 0-d statistics to log."""

POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def register_policy_loss(
    name: str, *, aliases: tuple[str, ...] = ()
) -> Callable[[PolicyLoss], PolicyLoss]:
    """Register a policy loss (decorator), selected by name from a trainer's config.

    It must take ``(logp, old_logp, advantages, mask)`` positionally, then the keywords
    ``weights`` (per-token importance weights ``[B, T]`` or None, multiplied into the per-token
    loss before aggregation), ``agg`` and ``normaliser`` (passed on to ``aggregate_loss``), and
    its own settings as keywords; it returns ``(loss, stats)`` (see ``ppo_policy_loss``).
    """
    return POLICY_LOSSES.register(name, aliases=aliases)


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as ``name``; ``UnknownNameError`` with a hint otherwise."""
    return POLICY_LOSSES.get(name)


def _aggregate(
    loss_mat: Tensor, mask: Tensor, agg: str, normaliser: Tensor | float | None
) -> Tensor:
    """``aggregate_loss``, passing the step's ``normaliser`` on only when one is given."""
    if normaliser is None:
        return aggregate_loss(loss_mat, mask, agg)
    return aggregate_loss(loss_mat, mask, agg, normaliser=normaliser)


def _weighted(per_token: Tensor, weights: Tensor | None) -> Tensor:
    """Per-token loss times detached per-token weights (truncated IS weights, rejection masks)."""
    if weights is None:
        return per_token
    _check_same_shape("the per-token loss", per_token, weights=weights)
    return per_token * _upcast(weights.detach())


def _check_same_shape(reference_name: str, reference: Tensor, **others: Tensor) -> None:
    # Shapes must match exactly: silent broadcasting ([B,1] against [B]) is a classic bug.
    for name, tensor in others.items():
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)} "
                f"(the shape of {reference_name})"
            )


def _per_token(advantages: Tensor, logp: Tensor) -> Tensor:
    """Advantages ``[B, T]`` as given, or per-sequence ``[B]`` broadcast over the tokens."""
    advantages = _upcast(advantages)
    if advantages.shape == logp.shape:
        return advantages
    if advantages.shape == logp.shape[:-1]:
        return advantages.unsqueeze(-1).expand_as(logp)
    raise ValueError(
        f"advantages has shape {tuple(advantages.shape)}; expected {tuple(logp.shape)} "
        f"(per token) or {tuple(logp.shape[:-1])} (per sequence)"
    )


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    agg: AggMode | str = "token-mean",
    normaliser: Tensor | float | None = None,
    *,
    max_tokens: int | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar over the valid (``mask != 0``) tokens.

    With ``m`` the mask, ``n_b = sum_t m[b,t]`` and ``S = {b : n_b > 0}``:

    - ``"token-mean"``: ``sum_{b,t} m*loss / D`` (every token weighs the same, so long
      responses weigh more; verl's and DAPO's default);
    - ``"seq-mean-token-sum"``: ``sum_{b in S} sum_t m*loss / D`` (no length normalisation);
    - ``"seq-mean-token-mean"``: ``sum_{b in S} (sum_t m*loss / n_b) / D`` (the original GRPO
      and seed 003's length-normalised ``log_prob.mean()``);
    - ``"seq-mean-token-sum-norm"``: ``sum_{b in S} sum_t m*loss / D`` with ``D = |S| * L``, L
      a constant (`max_tokens`; default the mask's width). Dr. GRPO (Liu et al. 2025,
      arXiv:2503.20783): each sequence's token sum over the same constant L, so neither
      long nor short answers are favoured; the mean over sequences keeps the learning rate's
      scale of the other modes. verl keeps L in ``agg_loss``'s ``loss_scale_factor``
      (``verl/trainer/ppo/core_algos.py`` at b178a3c) but divides by L only, so its loss grows with the
      number of sequences in a micro-batch.

    ``D`` is `normaliser` when given, else the local count (``sum m`` for token-mean, ``|S|``
    for the sequence means, ``|S| * L`` for the constant-normalised sum:
    :func:`aggregation_units`). Pass the optimizer step's *global* count (all micro-batches of
    the accumulation window on all processes) as `normaliser`: each micro-batch then returns
    its share of the step loss and the shares add up to the mean over the whole step,
    independent of the split (the fix of the Hugging Face gradient-accumulation bug that TRL
    passes as ``num_items_in_batch``; verl's ``agg_loss`` with the global token count and
    ``dp_size``). Without it, averaging per-micro-batch means weighs the tokens of short
    micro-batches more.

    Sequences without a single valid token are left out of the sequence means (as verl does);
    an all-zero mask gives 0 (still attached to the graph), never NaN. Values at masked
    positions are never read, so inf/NaN in padding cannot leak into the loss or its gradient
    through this function.

    Args:
        loss_mat: per-token loss, shape ``[B, T]``.
        mask: shape ``[B, T]``, bool or numeric; nonzero marks a valid token.
        agg: one of ``AGG_MODES``.
        normaliser: ``D`` above (> 0), e.g. the step's global :func:`aggregation_units`.
        max_tokens: L of ``"seq-mean-token-sum-norm"`` (e.g. the rollout's max_new_tokens:
            alignkit's masks also span the prompt columns); read only without `normaliser`.

    Returns:
        0-d tensor.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; valid: {', '.join(AGG_MODES)}")
    _check_same_shape("loss_mat", loss_mat, mask=mask)
    loss_mat = _upcast(loss_mat)
    valid = mask.bool()
    masked = torch.where(valid, loss_mat, loss_mat.new_zeros(()))
    if agg == "token-mean":
        total = masked.sum()
    else:
        seq_losses = masked.sum(dim=-1)
        if agg == "seq-mean-token-mean":
            seq_losses = seq_losses / valid.sum(dim=-1).clamp_min(1)
        total = seq_losses.sum()  # empty sequences contribute 0
    if normaliser is None:
        return total / aggregation_units(valid, agg, max_tokens=max_tokens).clamp_min(1)
    if not isinstance(normaliser, Tensor) and normaliser <= 0:  # a tensor is not synced
        raise ValueError(f"normaliser must be > 0, got {normaliser}")
    return total / normaliser


def aggregation_units(
    mask: Tensor, agg: AggMode | str = "token-mean", *, max_tokens: int | None = None
) -> Tensor:
    """What ``aggregate_loss(..., agg)`` averages over, counted in `mask`: valid tokens for
    ``"token-mean"``, sequences with at least one valid token for the sequence means, and
    those sequences times L (`max_tokens`, default the mask's width) for
    ``"seq-mean-token-sum-norm"``.

    Sum it over the micro-batches and processes of an optimizer step to get the `normaliser`.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; valid: {', '.join(AGG_MODES)}")
    valid = mask.bool()
    if agg == "token-mean":
        return valid.sum()
    sequences = valid.any(dim=-1).sum()
    if agg != "seq-mean-token-sum-norm":
        return sequences
    length = mask.shape[-1] if max_tokens is None else max_tokens
    if length < 1:
        raise ValueError(f"max_tokens must be >= 1, got {length}")
    return sequences * length


def policy_gradient_loss(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    agg: AggMode | str = "token-mean",
    *,
    weights: Tensor | None = None,
    normaliser: Tensor | float | None = None,
) -> Tensor:
    """REINFORCE loss ``-w * A * log pi(a_t | s_t)``, aggregated over valid tokens (seed 003).

    Williams 1992 (https://doi.org/10.1007/BF00992696): minimising it ascends
    ``E[A * grad log pi]``, raising the log-probability of tokens with positive advantage.
    With per-sequence advantages (the reward) and ``agg="seq-mean-token-mean"`` this is
    exactly seed 003's ``-log_probs.mean() * reward`` averaged over sequences.

    Args:
        logp: log-probabilities of the sampled tokens under the current policy, ``[B, T]``.
        advantages: ``[B, T]`` or per-sequence ``[B]``; treated as constants (pass them
            without grad).
        mask: ``[B, T]``, nonzero on response tokens.
        agg: see ``aggregate_loss``.
        weights: optional per-token weights ``w`` ``[B, T]`` (detached; 1 when None), e.g.
            ``ops.importance.truncated_importance_weights`` for samples from another policy.
        normaliser: the optimizer step's token (or sequence) count, see ``aggregate_loss``.

    Returns:
        0-d loss tensor (float32 for low-precision inputs).
    """
    logp = _upcast(logp)
    _check_same_shape("logp", logp, mask=mask)
    per_token = _weighted(-_per_token(advantages, logp) * logp, weights)
    return _aggregate(per_token, mask, agg, normaliser)


@register_policy_loss("policy_gradient", aliases=("pg",))
def _policy_gradient(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    weights: Tensor | None = None,
    agg: AggMode | str = "token-mean",
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    # Plain policy gradient (``policy_gradient_loss``) behind the registry's signature. It has
    # no ratio: for on-policy samples only (one update per rollout), or with ``weights``.
    # ``old_logp`` only feeds the logged approx_kl. (verl calls PPO's clipped loss "vanilla",
    # so that name is not used here.)
    loss = policy_gradient_loss(logp, advantages, mask, agg, weights=weights, normaliser=normaliser)
    stats: dict[str, Tensor] = {}
    if old_logp is not None:
        with torch.no_grad():
            _check_same_shape("logp", logp, old_logp=old_logp)
            stats["approx_kl"] = aggregate_loss(_upcast(old_logp) - _upcast(logp), mask)
    return loss, stats


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio: float = 0.2,
    clip_ratio_high: float | None = None,
    dual_clip: float | None = None,
    agg: AggMode | str = "token-mean",
    *,
    delta: float | None = None,
    weights: Tensor | None = None,
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, with optional asymmetric, dual or two-sided clipping;
    ``"ppo_clip"``.

    Schulman et al. 2017 (https://arxiv.org/abs/1707.06347): take the pessimistic (larger) of
    the unclipped and clipped losses, so the policy gains nothing by moving the probability
    ratio outside ``[1 - clip_ratio, 1 + clip_ratio_high]``. Per token::

        ratio = exp(clamp(logp - old_logp, -20, 20))
        pg    = max(-A * ratio, -A * clamp(ratio, 1 - clip_ratio, 1 + clip_ratio_high))

    ``clip_ratio_high`` (DAPO's "clip-higher", https://arxiv.org/abs/2503.14476) defaults to
    ``clip_ratio``. Dual clip (Ye et al. 2020, https://arxiv.org/abs/1912.09729): where A < 0
    an unbounded ratio would give an unbounded loss, so there ``pg = min(pg, -A * dual_clip)``.
    Two-sided clipping (INTELLECT-2, https://arxiv.org/abs/2505.07291; TRL's ``delta``) caps the
    unclipped branch instead: ``pg = max(-A * min(ratio, delta), -A * clamp(ratio, ...))``. For
    ``delta > 1 + clip_ratio_high`` (required) it only binds where A < 0 and ratio > delta, and
    equals dual clip with ``c = delta`` in value and gradient (tested); it is offered under
    TRL's name for recipes that use it, and the two are not combined.
    With ``weights`` the per-token loss is ``w * pg`` before aggregation (verl's and TRL's
    place for truncated importance weights of rollout-vs-trainer mismatch).

    Args:
        logp: log-probs of the sampled tokens under the current policy, ``[B, T]``.
        old_logp: the same under the policy that sampled them, ``[B, T]``.
        advantages: ``[B, T]`` or per-sequence ``[B]``; constants.
        mask: ``[B, T]``, nonzero on response tokens.
        clip_ratio: lower clip ``eps_low`` in (0, 1).
        clip_ratio_high: upper clip ``eps_high`` > 0; ``None`` means ``clip_ratio``.
        dual_clip: constant ``c > 1`` of dual-clip PPO; ``None`` disables it.
        agg: see ``aggregate_loss``.
        delta: two-sided clip bound ``> 1 + clip_ratio_high``; ``None`` disables it.
        weights: optional per-token weights ``[B, T]`` (detached), e.g.
            ``ops.importance.truncated_importance_weights(old_logp, behaviour_logp, cap)``.
        normaliser: the optimizer step's token (or sequence) count, see ``aggregate_loss``.

    Returns:
        ``(loss, stats)``: 0-d loss, and detached 0-d tensors (call ``.item()`` once, when
        logging) over valid tokens: ``"clipfrac"`` (share of tokens where the clipped branch
        is the larger one), ``"approx_kl"`` (mean of ``old_logp - logp``: tokens were sampled
        from the old policy, so this is the k1 estimate of KL(pi_old || pi)), and, when
        ``dual_clip`` (``delta``) is set, ``"dual_clipfrac"`` (share of tokens capped by it).
    """
    eps_low = clip_ratio
    eps_high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    if not 0.0 < eps_low < 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1), got {clip_ratio}")
    if eps_high <= 0.0:
        raise ValueError(f"clip_ratio_high must be > 0, got {clip_ratio_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if delta is not None and delta <= 1.0 + eps_high:
        raise ValueError(f"delta must be > 1 + clip_ratio_high = {1 + eps_high}, got {delta}")
    if delta is not None and dual_clip is not None:
        raise ValueError("dual_clip and delta bound the same branch; give one of them")
    logp, old_logp = _upcast(logp), _upcast(old_logp)
    _check_same_shape("logp", logp, old_logp=old_logp, mask=mask)
    advantages = _per_token(advantages, logp)

    log_ratio = torch.clamp(logp - old_logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(unclipped, clipped)

    stats: dict[str, Tensor] = {}
    with torch.no_grad():
        stats["clipfrac"] = aggregate_loss((clipped > unclipped).to(logp.dtype), mask)
        stats["approx_kl"] = aggregate_loss(-log_ratio, mask)
    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        capped = (advantages < 0) & (pg > dual_bound)
        with torch.no_grad():
            stats["dual_clipfrac"] = aggregate_loss(capped.to(logp.dtype), mask)
        pg = torch.where(advantages < 0, torch.minimum(pg, dual_bound), pg)
    if delta is not None:
        with torch.no_grad():
            capped = (advantages < 0) & (ratio > delta)
            stats["dual_clipfrac"] = aggregate_loss(capped.to(logp.dtype), mask)
        pg = torch.maximum(-advantages * torch.clamp(ratio, max=delta), clipped)
    return _aggregate(_weighted(pg, weights), mask, agg, normaliser), stats


register_policy_loss("ppo_clip")(ppo_policy_loss)


def value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = None,
    agg: AggMode | str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Squared-error critic loss ``0.5 * (V - R)^2``, optionally clipped around the old values.

    PPO's value clipping (as in OpenAI baselines / verl): the critic may not profit from moving
    ``V`` more than ``clip`` away from ``old_values`` in one update. Per token::

        V_clipped = old_values + clamp(V - old_values, -clip, clip)
        loss      = 0.5 * max((V - R)^2, (V_clipped - R)^2)

    Args:
        values: current critic values, ``[B, T]``.
        old_values: critic values at rollout time, ``[B, T]``; only read when ``clip`` is set
            (may be ``None`` otherwise).
        returns: regression targets ``R``, ``[B, T]``; constants.
        mask: ``[B, T]``, nonzero on response tokens.
        clip: clip range > 0, or ``None`` for the plain squared error.
        agg: see ``aggregate_loss``.

    Returns:
        ``(loss, stats)``: 0-d loss and ``{"vf_clipfrac": ...}``, the detached share of valid
        tokens where the clipped error is the larger one (0 without ``clip``).
    """
    values, returns = _upcast(values), _upcast(returns)
    _check_same_shape("values", values, returns=returns, mask=mask)
    unclipped = 0.5 * (values - returns).square()
    if clip is None:
        return aggregate_loss(unclipped, mask, agg), {"vf_clipfrac": values.new_zeros(())}
    if clip <= 0.0:
        raise ValueError(f"value clip must be > 0, got {clip}")
    if old_values is None:
        raise ValueError("value_loss with clip needs old_values")
    old_values = _upcast(old_values)
    _check_same_shape("values", values, old_values=old_values)
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = 0.5 * (values_clipped - returns).square()
    with torch.no_grad():
        clipfrac = aggregate_loss((clipped > unclipped).to(values.dtype), mask)
    return aggregate_loss(torch.maximum(unclipped, clipped), mask, agg), {"vf_clipfrac": clipfrac}
