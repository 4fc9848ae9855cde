"""The KL(pi || ref) term of the online trainers, in one place.

Where the term goes (``kl.placement``) decides everything else::

    placement: reward   r_t = score_t - beta * KL_t         (before the advantages; shape_rewards)
    placement: loss     L  += beta * agg(kl_loss_t * w_t)   (in each micro-batch; loss_term)

with ``KL_t`` a value estimate (``ops.kl.kl_estimate``, k1 by default), ``kl_loss_t`` a loss
whose gradient is the wanted one (``ops.kl.kl_loss``, k3+ by default) and ``w_t = pi/pi_old``
(x the behaviour weights) the correction for samples of an older policy
(``ops.kl.kl_loss_weights``). Either way the reference log-probs are computed once per
iteration, only when the term is on (``reference_logprobs``), ``kl/mean`` logs the k1 estimate
of KL(pi || ref) on the sampled tokens, and after the iteration the controller (fixed, or
adaptive towards ``kl.target``) moves beta (``after_iteration``, logged as ``kl/coef``: the
value this iteration used).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

from alignkit.ops.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    kl_estimate,
    kl_loss,
    kl_loss_weights,
)
from alignkit.ops.losses import aggregate_loss
from alignkit.ops.stats import masked_mean
from alignkit.rollout import Experience
from alignkit.trainers.reference import ReferencePolicy
from alignkit.trainers.rl_config import KLConfig

if TYPE_CHECKING:
    from alignkit.runloop.run import RunLoop

__all__ = ["KLPenalty"]

#: ``score(model, exp) -> [N, T]`` log-probs of exp's response tokens under `model`.
Scorer = Callable[[nn.Module, Experience], Tensor]


class KLPenalty:
    """The KL term: its placement, estimator, coefficient controller and reference.

    Args:
        config: the ``kl`` settings (``coef = 0``: off; every method is then a no-op).
    """

    def __init__(self, config: KLConfig) -> None:
        self.config = config
        self.estimator = config.resolved_estimator
        self.controller: FixedKLController | AdaptiveKLController = (
            AdaptiveKLController(config.coef, config.target, config.horizon, config.rule)
            if config.controller == "adaptive"
            else FixedKLController(config.coef)
        )
        self.reference: ReferencePolicy | None = None

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def in_reward(self) -> bool:
        return self.enabled and self.config.placement == "reward"

    @property
    def in_loss(self) -> bool:
        return self.enabled and self.config.placement == "loss"

    @property
    def coef(self) -> float:
        """beta, the controller's current value."""
        return self.controller.value

    def prepare(self, trainer: RunLoop, path: str | None, *, dtype: str) -> None:
        """Build the reference when the term is on (after the policy is prepared, before the
        first update: without `path` it is a frozen copy of the initial policy, or the policy
        with its LoRA adapter disabled)."""
        if self.enabled:
            self.reference = ReferencePolicy(trainer, path, dtype=dtype, snapshot=True)

    def reference_logprobs(self, exp: Experience, score: Scorer) -> Tensor | None:
        """``[N, T]`` log ref(y_t) of the sampled tokens, or None when the term is off."""
        if self.reference is None:
            return None
        with self.reference.use() as reference:
            return score(reference, exp)

    def shape_rewards(self, token_scores: Tensor, exp: Experience) -> Tensor:
        """``r_t = score_t - beta * KL_t`` on response tokens when placed in the reward (KL_t
        of pi_old, the policy that sampled); `token_scores` unchanged otherwise."""
        if not self.in_reward:
            return token_scores
        rewards, _ = apply_kl_penalty(
            token_scores,
            exp.old_logprobs,
            exp.reference_logprobs,
            exp.response_mask,
            self.coef,
            self.estimator,
        )
        return rewards

    def loss_term(
        self, logp: Tensor, batch: Experience, mask: Tensor, agg: str, normaliser: Tensor
    ) -> Tensor | None:
        """This micro-batch's share of the step's KL loss ``agg(kl_loss_t * w_t)`` (to be
        multiplied by beta, see :attr:`coef`), aggregated like the policy loss (the same
        `mask`, mode and step normaliser); None unless placed in the loss. `logp` carries the
        gradient."""
        if not self.in_loss:
            return None
        weights = kl_loss_weights(logp, batch.old_logprobs, batch.is_weights)
        tokens = kl_loss(logp, batch.reference_logprobs, self.estimator)
        return aggregate_loss(tokens * weights, mask, agg, normaliser=normaliser)

    def metrics(self, exp: Experience) -> dict[str, Tensor]:
        """``kl/mean``: the k1 estimate of KL(pi_old || ref) per response token, whatever the
        placement and estimator (an unbiased value, comparable across settings)."""
        if exp.reference_logprobs is None:
            return {}
        k1 = kl_estimate(exp.old_logprobs, exp.reference_logprobs, "k1")
        return {"kl/mean": masked_mean(k1, exp.response_mask)}

    def after_iteration(self, metrics: Mapping[str, Tensor], sequences: int) -> dict[str, float]:
        """Move beta from the iteration's ``kl/mean`` (measured on `sequences` sequences);
        returns ``kl/coef``, the value the iteration used."""
        if not self.enabled:
            return {}
        used = self.coef
        self.controller.update(float(metrics["kl/mean"]), sequences)
        return {"kl/coef": used}
