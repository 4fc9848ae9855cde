"""Preference losses: the DPO family, pairwise reward-model losses (and the multi-task reward
loss), Plackett-Luce rankings, and the orientation of pairs.

All return *per-example* losses, so the caller chooses the weighting and the mean (and can
log per-example values). Low-precision inputs (bf16/fp16) are upcast to float32 first; float64
stays float64. Import them from ``alignkit.ops.losses``, which re-exports this module.

Losses are selected by name from a registry (``DPO_LOSSES``, ``REWARD_LOSSES``): a new kind is
one decorated function (here or in user code), and no trainer or config changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.errors import ConfigError
from alignkit.ops._dtype import at_least_float32
from alignkit.ops._registry import Registry

__all__ = [
    "DPO_LOSSES",
    "REWARD_LOSSES",
    "cost_model_loss",
    "dpo_loss",
    "is_reference_free",
    "length_normalized_logps",
    "length_normalized_nll",
    "multitask_reward_loss",
    "orient_pairs",
    "orpo_loss",
    "plackett_luce_loss",
    "reference_free_dpo_loss",
    "register_dpo_loss",
    "register_reward_loss",
    "reward_model_loss",
    "simpo_loss",
]

# (h, beta, label_smoothing) -> per-example loss, where h is the log-ratio difference
# (pi_c - ref_c) - (pi_r - ref_r).
DPOLossFn = Callable[[Tensor, float, float], Tensor]
# Reference-free kinds: (chosen, rejected, beta, gamma) -> per-example loss, where chosen and
# rejected are the policy's per-token mean log-probs and gamma the kind's margin (None: its
# default).
ReferenceFreeLossFn = Callable[[Tensor, Tensor, float, "float | None"], Tensor]
DPO_LOSSES: Registry[DPOLossFn | ReferenceFreeLossFn] = Registry("DPO loss")
# Canonical names of the kinds registered with reference_free=True.
_REFERENCE_FREE: set[str] = set()

# (r_chosen - r_rejected, margin or None) -> per-example loss; each kind owns its margin default.
RewardLossFn = Callable[[Tensor, "Tensor | float | None"], Tensor]
REWARD_LOSSES: Registry[RewardLossFn] = Registry("reward loss")

_upcast = at_least_float32


def register_dpo_loss(
    name: str, *, aliases: tuple[str, ...] = (), reference_free: bool = False
) -> Callable[[Any], Any]:
    """Register a loss of the DPO family as the DPO trainer's ``dpo.kind: name``.

    - ``reference_free=False``: ``fn(h, beta, label_smoothing) -> losses``, used by
      ``dpo_loss(kind=name)``. ``fn`` should raise ``ValueError`` for a ``label_smoothing`` it
      has no place for: the trainer asks it once when checking its config.
    - ``reference_free=True``: ``fn(chosen, rejected, beta, gamma) -> losses`` on the policy's
      per-token mean log-probs, used by ``reference_free_dpo_loss(kind=name)``; ``gamma`` is
      the kind's margin (None: its default), and ``fn`` should raise ``ValueError`` for one it
      has no place for. The DPO trainer runs no reference pass for such a kind.
    """
    register = DPO_LOSSES.register(name, aliases=aliases)

    def decorator(fn: Any) -> Any:
        register(fn)
        if reference_free:
            _REFERENCE_FREE.add(name)
        else:
            _REFERENCE_FREE.discard(name)  # a name re-registered after an unregister
        return fn

    return decorator


def is_reference_free(kind: str) -> bool:
    """Whether the DPO loss ``kind`` (a name or alias) was registered ``reference_free``."""
    return DPO_LOSSES.canonical(kind) in _REFERENCE_FREE


def register_reward_loss(
    name: str, *, aliases: tuple[str, ...] = ()
) -> Callable[[RewardLossFn], RewardLossFn]:
    """Register ``fn(d, margin) -> losses`` (``d = r_chosen - r_rejected``, ``margin`` a tensor,
    float or None, each kind choosing its own default) as ``reward_model_loss(kind=name)`` and
    the reward-model trainer's ``loss: name``."""
    return REWARD_LOSSES.register(name, aliases=aliases)


def _require_no_label_smoothing(kind: str, label_smoothing: float) -> None:
    # Refuse rather than silently ignore a setting the chosen loss has no place for.
    if label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing is not defined for kind={kind!r}; use 'sigmoid' or 'robust'"
        )


@register_dpo_loss("sigmoid")
def _dpo_sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # DPO (https://arxiv.org/abs/2305.18290, eq. 7); with eps > 0 the conservative cDPO of
    # Mitchell 2023 (https://ericmitchell.ai/cdpo.pdf, eq. 3): the label is flipped w.p. eps.
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5] for 'sigmoid', got {label_smoothing}"
        )
    z = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@register_dpo_loss("ipo")
def _dpo_ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # IPO (https://arxiv.org/abs/2310.12036, eq. 17): regress h onto 1/(2 beta) instead of
    # pushing it to infinity. Seed 002 writes 1/beta; the paper (and TRL) use 1/(2 beta).
    _require_no_label_smoothing("ipo", label_smoothing)
    return (h - 1.0 / (2.0 * beta)).square()


@register_dpo_loss("hinge")
def _dpo_hinge(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # SLiC-HF calibration loss (https://arxiv.org/abs/2305.10425) on the reference-adjusted
    # log-ratio: relu(1 - beta*h) = beta * relu(1/beta - h), i.e. a margin of 1/beta nats.
    _require_no_label_smoothing("hinge", label_smoothing)
    return F.relu(1.0 - beta * h)


@register_dpo_loss("robust")
def _dpo_robust(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409, eq. 9): unbiased
    # under labels flipped w.p. eps: (1-eps)*L(h) + eps*L(-h) equals the clean DPO loss.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust', got {label_smoothing}")
    eps = label_smoothing
    z = beta * h
    return ((1.0 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation and its variants, per example.

    DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290): the policy is its own reward
    model, ``r = beta * log(pi / ref)``, so a Bradley-Terry loss on the implicit rewards trains
    the policy directly. With ``h = (pi_c - ref_c) - (pi_r - ref_r)`` and ``eps = label_smoothing``:

    - ``"sigmoid"``: ``-(1-eps) log s(beta h) - eps log s(-beta h)`` (DPO; cDPO when eps > 0).
    - ``"ipo"``: ``(h - 1/(2 beta))^2`` (Azar et al. 2023, https://arxiv.org/abs/2310.12036).
      The paper defines h on length-averaged log-probs (TRL averages before calling it); this
      function uses whatever log-probs it is given, so pass averaged ones to match.
    - ``"hinge"``: ``relu(1 - beta h)`` (SLiC-HF, https://arxiv.org/abs/2305.10425).
    - ``"robust"``: ``((1-eps)(-log s(beta h)) + eps log s(-beta h)) / (1 - 2 eps)``
      (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409), eps < 0.5.

    ``"ipo"`` and ``"hinge"`` take no label smoothing (a nonzero value is an error). More kinds:
    ``register_dpo_loss``.

    Args:
        policy_chosen_logps: summed log-probs of the chosen responses under the policy, ``[B]``.
        policy_rejected_logps: the same for the rejected responses, ``[B]``.
        ref_chosen_logps: chosen responses under the frozen reference, ``[B]``.
        ref_rejected_logps: rejected responses under the reference, ``[B]``.
        beta: inverse temperature of the implicit reward (> 0).
        kind: a name in ``DPO_LOSSES``.
        label_smoothing: assumed label-flip probability ``eps``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; the rewards are the
        detached implicit rewards ``beta * (pi - ref)`` of each response.
    """
    loss_fn = DPO_LOSSES.get(kind)
    if is_reference_free(kind):
        raise ValueError(f"DPO loss {kind!r} is reference-free: use reference_free_dpo_loss")
    if beta <= 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shape = policy_chosen_logps.shape
    for name, tensor in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    chosen_logratios = _upcast(policy_chosen_logps) - _upcast(ref_chosen_logps)
    rejected_logratios = _upcast(policy_rejected_logps) - _upcast(ref_rejected_logps)
    losses = loss_fn(chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, beta: float = 2.0, gamma: float = 0.5
) -> Tensor:
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6), per example.

    ``-log s(beta * (avg_c - avg_r) - gamma)``: a Bradley-Terry loss on the length-averaged
    policy log-probs as the implicit reward (no reference model), with a target reward margin
    ``gamma`` the chosen response must clear. The paper's defaults: beta 2 to 2.5,
    ``gamma / beta`` about 0.5; ``gamma`` 0.5 is TRL's ``simpo_gamma`` default.

    Args:
        chosen_logps, rejected_logps: per-token mean log-probs of each response under the
            policy (``length_normalized_logps``), ``[B]`` each.
        beta: reward scale (> 0).
        gamma: target reward margin (>= 0).
    """
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(
            f"rejected_logps has shape {tuple(rejected_logps.shape)}, "
            f"expected {tuple(chosen_logps.shape)}"
        )
    if gamma < 0.0:
        raise ValueError(f"SimPO's gamma must be >= 0, got {gamma}")
    margin = _upcast(chosen_logps) - _upcast(rejected_logps)
    return -F.logsigmoid(beta * margin - gamma)


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, lam: float = 0.1) -> Tensor:
    """ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691, eqs. 2-7), per example.

    ``NLL(chosen) - lam * log s(log odds_c - log odds_r)``, where ``NLL = -avg_c`` is the
    chosen response's per-token NLL, ``odds = p / (1 - p)`` and ``p = exp(avg)`` the
    geometric-mean token probability, so ``log odds = avg - log(1 - exp(avg))`` (computed as
    ``log1p(-exp(avg))``, finite for every ``avg < 0``). SFT and preference alignment in one
    loss, no reference model. ``lam`` is TRL's ORPO ``beta`` (default 0.1).

    Args:
        chosen_logps, rejected_logps: per-token mean log-probs of each response under the
            policy (``length_normalized_logps``), ``[B]`` each; strictly negative.
        lam: weight of the odds-ratio term (> 0).
    """
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(
            f"rejected_logps has shape {tuple(rejected_logps.shape)}, "
            f"expected {tuple(chosen_logps.shape)}"
        )
    chosen, rejected = _upcast(chosen_logps), _upcast(rejected_logps)
    log_odds_ratio = (chosen - torch.log1p(-torch.exp(chosen))) - (
        rejected - torch.log1p(-torch.exp(rejected))
    )
    return -chosen - lam * F.logsigmoid(log_odds_ratio)


@register_dpo_loss("simpo", reference_free=True)
def _dpo_simpo(chosen: Tensor, rejected: Tensor, beta: float, gamma: float | None) -> Tensor:
    return simpo_loss(chosen, rejected, beta, 0.5 if gamma is None else gamma)


@register_dpo_loss("orpo", reference_free=True)
def _dpo_orpo(chosen: Tensor, rejected: Tensor, beta: float, gamma: float | None) -> Tensor:
    # beta is ORPO's lambda, as in TRL's ORPOConfig.
    if gamma is not None:
        raise ValueError("a margin gamma is not defined for kind='orpo'; only 'simpo' has one")
    return orpo_loss(chosen, rejected, beta)


def reference_free_dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float,
    kind: str,
    gamma: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A reference-free loss of the DPO family (``"simpo"``, ``"orpo"``, or one registered
    with ``register_dpo_loss(name, reference_free=True)``), per example.

    - ``"simpo"``: ``simpo_loss(chosen, rejected, beta, gamma)`` (gamma default 0.5).
    - ``"orpo"``: ``orpo_loss(chosen, rejected, lam=beta)`` (no gamma).

    Args:
        chosen_logps, rejected_logps: per-token mean log-probs under the policy, ``[B]`` each.
        beta: the kind's scale (> 0).
        kind: a reference-free name in ``DPO_LOSSES``.
        gamma: the kind's margin; None for its default.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; the rewards are the
        detached implicit rewards ``beta * avg`` (TRL's SimPO/ORPO ``rewards/*``).
    """
    loss_fn = DPO_LOSSES.get(kind)
    if not is_reference_free(kind):
        raise ValueError(f"DPO loss {kind!r} needs reference log-probs: use dpo_loss")
    if beta <= 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    losses = loss_fn(chosen_logps, rejected_logps, beta, gamma)
    chosen, rejected = _upcast(chosen_logps).detach(), _upcast(rejected_logps).detach()
    return losses, beta * chosen, beta * rejected


def length_normalized_logps(summed_logps: Tensor, token_counts: Tensor) -> Tensor:
    """Mean per-token log-prob of each response, per example: ``log pi(y|x) / |y|``.

    What TRL's IPO (and the IPO paper, Azar et al. 2023, https://arxiv.org/abs/2310.12036,
    which defines its log-ratio on averaged log-probs) and SimPO (Meng et al. 2024,
    https://arxiv.org/abs/2405.14734, eq. 4) put in place of the summed log-prob. Applied to
    the policy's and the reference's log-probs alike, the log-ratio becomes a per-token one:
    ``(log pi - log ref) / |y|``. A response with no tokens is divided by 1 (it stays 0).

    Args:
        summed_logps: summed log-probs of each response, ``[B]``.
        token_counts: number of response tokens of each, ``[B]`` (integer or float).
    """
    if summed_logps.shape != token_counts.shape:
        raise ValueError(
            f"token_counts has shape {tuple(token_counts.shape)}, "
            f"expected {tuple(summed_logps.shape)}"
        )
    counts = token_counts.to(_upcast(summed_logps).dtype)
    return _upcast(summed_logps) / counts.clamp(min=1.0)


def length_normalized_nll(summed_logps: Tensor, token_counts: Tensor) -> Tensor:
    """Per-token negative log-likelihood of each response, per example: ``-log pi(y|x) / |y|``.

    The NLL term of RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733, eq. 4): added to a
    DPO loss on the winning response, ``loss = dpo + alpha * nll``, it stops DPO from meeting its
    margins by lowering the winner's likelihood along with the loser's. Dividing by the length
    keeps long and short winners on one scale. A response with no tokens has NLL 0.

    Args:
        summed_logps: summed log-probs of each response, ``[B]``.
        token_counts: number of response tokens of each, ``[B]`` (integer or float).
    """
    return -length_normalized_logps(summed_logps, token_counts)


@register_reward_loss("bt")
def _reward_bt(diff: Tensor, margin: Tensor | float | None) -> Tensor:
    # Bradley-Terry; the margin is subtracted inside as in Llama 2
    # (https://arxiv.org/abs/2307.09288, eq. 2): pairs rated far apart must be separated more.
    return -F.logsigmoid(diff if margin is None else diff - margin)


@register_reward_loss("margin_weighted")
def _reward_margin_weighted(diff: Tensor, margin: Tensor | float | None) -> Tensor:
    # Seed 002 §4.2.4: the margin *scales* the logit (a per-pair temperature). A different
    # loss from Llama 2's subtraction (NOTES); the margin should be >= 0.
    return -F.logsigmoid(diff if margin is None else diff * margin)


@register_reward_loss("hinge")
def _reward_hinge(diff: Tensor, margin: Tensor | float | None) -> Tensor:
    # Seed 002 §4.3.4 ``ranking_loss`` defaults to margin 0, where every correctly ordered pair
    # has zero loss and the reward scale is left free; we default to the usual hinge margin 1.
    return F.relu((1.0 if margin is None else margin) - diff)


def reward_model_loss(
    chosen: Tensor,
    rejected: Tensor,
    margin: Tensor | float | None = None,
    kind: str = "bt",
) -> Tensor:
    """Pairwise reward-model loss, per example.

    Bradley-Terry (seed 002 §4.3.1): ``P(chosen > rejected) = s(r_c - r_r)``. With
    ``d = r_c - r_r`` and ``m = margin``:

    - ``"bt"``: ``-log s(d - m)``; ``m`` defaults to 0 (plain BT). Llama 2's margin loss.
    - ``"margin_weighted"``: ``-log s(d * m)``; ``m`` defaults to 1 (seed 002 §4.2.4).
    - ``"hinge"``: ``relu(m - d)``; ``m`` defaults to 1 (seed 002's ``ranking_loss`` uses 0).

    Importance weights outside the log (seed 002's ``weighted_bt_loss``) are the caller's
    ``(losses * weights).mean()``, which is why per-example losses are returned.

    Args:
        chosen: rewards of the preferred responses, ``[B]``.
        rejected: rewards of the other responses, same shape as ``chosen``.
        margin: a float, or a tensor broadcastable to ``chosen`` (per-pair margins ``[B]``).
        kind: a name in ``REWARD_LOSSES``.

    Returns:
        Per-example losses, shape of ``chosen``.
    """
    loss_fn = REWARD_LOSSES.get(kind)
    if rejected.shape != chosen.shape:
        raise ValueError(
            f"rejected has shape {tuple(rejected.shape)}, expected {tuple(chosen.shape)} "
            "(the shape of chosen)"
        )
    if isinstance(margin, Tensor):
        if torch.broadcast_shapes(margin.shape, chosen.shape) != chosen.shape:
            raise ValueError(
                f"margin has shape {tuple(margin.shape)}, not broadcastable to "
                f"{tuple(chosen.shape)}"
            )
        margin = _upcast(margin)
    return loss_fn(_upcast(chosen) - _upcast(rejected), margin)


def cost_model_loss(
    cost_chosen: Tensor,
    cost_rejected: Tensor,
    delta_safety: Tensor,
    chosen_unsafe: Tensor,
    rejected_unsafe: Tensor,
) -> tuple[Tensor, Tensor]:
    """Cost-model loss of Safe RLHF (Dai et al. 2023, arXiv:2310.12773, eq. 6), per example.

    A cost model scores how harmful a response is, with ``cost > 0`` meaning *unsafe*. Two
    terms: the less safe response of a pair must cost more (Bradley-Terry), and each cost's
    sign must match the response's safe/unsafe label (a classification term that anchors
    zero as the boundary)::

        pairwise = -log s(c_less_safe - c_safer)            (pairs with delta_S != 0 only)
        sign     = -log s(y_c * c_c) - log s(y_r * c_r),  y = +1 if unsafe else -1

    Args:
        cost_chosen, cost_rejected: costs of the two responses, ``[B]``.
        delta_safety: ``safety(chosen) - safety(rejected)``, ``[B]`` (> 0: chosen is safer);
            pairs with ``delta_safety == 0`` contribute no pairwise term.
        chosen_unsafe, rejected_unsafe: 1 where the response is labelled unsafe, else 0, ``[B]``.

    Returns:
        ``(pairwise, sign)`` per-example terms ``[B]``; ``pairwise`` is 0 where
        ``delta_safety == 0``. The usual total is ``(pairwise + sign).mean()``.
    """
    if not (cost_chosen.shape == cost_rejected.shape == delta_safety.shape):
        raise ValueError(
            "cost_chosen, cost_rejected and delta_safety must have the same shape, got "
            f"{tuple(cost_chosen.shape)}, {tuple(cost_rejected.shape)}, "
            f"{tuple(delta_safety.shape)}"
        )
    c_chosen, c_rejected = _upcast(cost_chosen), _upcast(cost_rejected)
    # The less safe response is the rejected one when chosen is safer (delta_S > 0).
    chosen_safer = delta_safety > 0
    less_safe = torch.where(chosen_safer, c_rejected, c_chosen)
    safer = torch.where(chosen_safer, c_chosen, c_rejected)
    pairwise = torch.where(
        delta_safety != 0, -F.logsigmoid(less_safe - safer), torch.zeros_like(less_safe)
    )
    sign_chosen = 2.0 * _upcast(chosen_unsafe) - 1.0
    sign_rejected = 2.0 * _upcast(rejected_unsafe) - 1.0
    sign = -F.logsigmoid(sign_chosen * c_chosen) - F.logsigmoid(sign_rejected * c_rejected)
    return pairwise, sign


def _labelled_mean(losses: Tensor, targets: Tensor) -> Tensor:
    # NaN targets mark unlabelled examples (e.g. pairs without safety labels): left out.
    labelled = ~torch.isnan(targets)
    if not labelled.any():
        return losses.sum() * 0.0  # keeps the graph, contributes nothing
    return losses[labelled].mean()


def multitask_reward_loss(
    chosen: Tensor,
    rejected: Tensor,
    *,
    kind: str = "bt",
    margin: Tensor | float | None = None,
    chosen_aux: Mapping[str, Tensor] | None = None,
    rejected_aux: Mapping[str, Tensor] | None = None,
    helpfulness: tuple[Tensor, Tensor] | None = None,
    is_safe: tuple[Tensor, Tensor] | None = None,
    task_weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise loss plus the auxiliary-head losses (seed 002 §4.3.4's ``MultiTaskRewardLoss``).

    ``total = w_pref * preference + w_help * helpfulness + w_safe * safety``, where

    - ``preference = mean(reward_model_loss(r_chosen, r_rejected, margin, kind))``;
    - ``helpfulness = MSE(aux["helpfulness"], target)`` over chosen and rejected responses;
    - ``safety = BCE-with-logits(aux["safety"], is_safe)`` over chosen and rejected responses
      (the head's logit is that the response is safe).

    An auxiliary term is included when its targets are given; NaN targets mark unlabelled
    responses and are left out. ``task_weights`` keys: ``preference``, ``helpfulness``,
    ``safety`` (default 1 each; another key is a ``ConfigError``). Per-pair importance weights
    are the caller's ``(reward_model_loss(...) * w).mean()``.

    Args:
        chosen, rejected: rewards of the preferred and the other responses, ``[B]`` each.
        chosen_aux, rejected_aux: auxiliary head outputs by head name, ``[B]`` each.
        helpfulness: ``(chosen_scores, rejected_scores)``, float ``[B]`` each.
        is_safe: ``(chosen_labels, rejected_labels)``, 1 = safe, 0 = unsafe, float ``[B]`` each.

    Returns:
        ``(total, parts)`` with ``parts`` holding each included term, detached.
    """
    weights = {"preference": 1.0, "helpfulness": 1.0, "safety": 1.0}
    for key, value in (task_weights or {}).items():
        if key not in weights:
            raise ConfigError(f"unknown task weight '{key}'; valid: {', '.join(weights)}")
        weights[key] = float(value)
    chosen_aux, rejected_aux = chosen_aux or {}, rejected_aux or {}

    parts = {"preference": reward_model_loss(chosen, rejected, margin=margin, kind=kind).mean()}
    for name, targets in (("helpfulness", helpfulness), ("safety", is_safe)):
        if targets is None:
            continue
        if name not in chosen_aux or name not in rejected_aux:
            raise ValueError(f"{name} targets given but the model has no '{name}' head")
        predicted = _upcast(torch.cat([chosen_aux[name], rejected_aux[name]]))
        target = torch.cat([targets[0], targets[1]]).to(predicted)
        filled = torch.nan_to_num(target, nan=0.0)
        if name == "helpfulness":
            losses = F.mse_loss(predicted, filled, reduction="none")
        else:
            losses = F.binary_cross_entropy_with_logits(predicted, filled, reduction="none")
        parts[name] = _labelled_mean(losses, target)
    total = sum(weights[name] * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}


def orient_pairs(chosen: Tensor, rejected: Tensor, flip: Tensor) -> tuple[Tensor, Tensor]:
    """Re-order pairs by another criterion: ``(winner, loser)`` with the two swapped where
    ``flip`` is True.

    ``winner = where(flip, rejected, chosen)``, ``loser = where(flip, chosen, rejected)``.
    Safe-DPO (seed 000) orders each pair a second time by safety: ``flip = ~(delta_S > 0)``
    makes the safer response the winner of its safety term; apply the same ``flip`` to the
    policy log-probs, the reference log-probs and the lengths so that they stay aligned.

    Args:
        chosen, rejected: per-pair values ``[B]`` (any same shape).
        flip: bool ``[B]`` (broadcastable to ``chosen``).
    """
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ"
        )
    flip = flip.bool()
    return torch.where(flip, rejected, chosen), torch.where(flip, chosen, rejected)


def plackett_luce_loss(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Negative log-likelihood of a ranking under the Plackett-Luce model, per example.

    Plackett 1975 / Luce 1959; for reward models, Zhu et al. 2023
    (https://arxiv.org/abs/2301.11270). The best item is picked first with softmax probability,
    then the best of the rest, and so on (seed 002 §4.3.1)::

        loss = -sum_{i=1}^{K-1} [ s_i - logsumexp(s_i, ..., s_K) ]

    with items given best to worst along dim 1. For K = 2 it is the Bradley-Terry loss
    ``-log s(s_1 - s_2)``. The suffix log-sum-exps come from one ``logcumsumexp`` over the
    reversed scores.

    Args:
        scores: rewards of the K responses of each prompt, best first, ``[B, K]``.
        mask: optional ``[B, K]``, nonzero on real items (for prompts with fewer than K
            responses). Masked items are removed from the ranking; a row with fewer than two
            real items has loss 0.

    Returns:
        Per-example losses, ``[B]``.
    """
    scores = _upcast(scores)
    if mask is None:
        suffix_lse = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
        return -(scores - suffix_lse).sum(dim=-1)
    if mask.shape != scores.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(scores.shape)}")
    valid = mask.bool()
    # A finite stand-in for -inf: exp(lowest - anything finite) is exactly 0, and every
    # intermediate stays finite, so no NaN is formed even in the branch `where` discards
    # (with -inf, a fully masked suffix gives (-inf) - (-inf)).
    lowest = torch.finfo(scores.dtype).min
    filled = torch.where(valid, scores, scores.new_full((), lowest))
    suffix_lse = torch.logcumsumexp(filled.flip(-1), dim=-1).flip(-1)
    terms = torch.where(valid, filled - suffix_lse, scores.new_zeros(()))
    return -terms.sum(dim=-1)
