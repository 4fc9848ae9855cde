"""``BehaviourCorrection``: the importance weights of rollouts that were not drawn from the
trainer's own distribution, and their metrics (a component of the policy-gradient trainer).

Rollouts need it when the engine declares that its samples or its numbers are not the
trainer's (``samples_policy`` / ``logprobs_match_trainer`` false): a teacher mixture, a top-k/
top-p/EOS-suppressed sampler, a vLLM server (another process, maybe another dtype, maybe weights
a few optimizer steps old). The weights are ``ops.importance.rollout_correction`` of

- the *target*: the trainer's log-probs of the sampled tokens under the distribution the sampler
  was meant to draw from: ``softmax(logits / T)``, truncated and renormalised like the sampler
  (top-k, top-p, EOS suppressed) when it truncates; with identical numerics a truncated sampler
  then gets weights of exactly 1, not the kept mass (trl#6789);
- the *behaviour*: the log-probs the engine recorded.

They multiply the per-token policy loss (and the KL term), as ``rollout.correction`` sets:
token/sequence level, truncate/mask, cap. Metrics (means over response tokens):
``rollout/is_weight_mean``, ``sampling/is_weight_max``, ``sampling/ess`` (Kish, as a share),
``rollout/is_truncated_frac`` or ``rollout/is_masked_frac`` (the share of tokens, or sequences
at sequence level, that the bounds changed) and ``rollout/mismatch_kl_k1`` / ``_k3`` (KL of the
sampler from the trainer's target, ``ops.kl.mismatch_kl``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignkit.ops.importance import (
    RolloutCorrection,
    effective_sample_size,
    rollout_correction,
)
from alignkit.ops.kl import mismatch_kl
from alignkit.ops.sampling import truncate_logits
from alignkit.rollout import Experience, SamplingConfig
from alignkit.trainers.engine_config import CorrectionConfig

__all__ = ["BehaviourCorrection", "sampler_logits_filter"]


def sampler_logits_filter(
    sampling: SamplingConfig, eos_token_id: int | None
) -> Callable[[Tensor], Tensor] | None:
    """What the sampler does to the temperature-scaled logits beyond the softmax (suppress EOS,
    then top-k and top-p), as a ``token_logprobs(logits_filter=...)``; None when nothing."""
    banned = eos_token_id if sampling.suppress_eos else None
    if sampling.top_k == 0 and sampling.top_p == 1.0 and banned is None:
        return None

    def sampler(scaled: Tensor) -> Tensor:
        if banned is not None:
            scaled = scaled.clone()
            scaled[..., banned] = float("-inf")
        return truncate_logits(scaled, sampling.top_k, sampling.top_p)

    return sampler


class BehaviourCorrection:
    """See the module docstring.

    Args:
        config: ``rollout.correction``.
        sampling: how the rollouts are sampled (its truncation defines the target).
        eos_token_id: the EOS a ``suppress_eos`` sampler never draws.
    """

    def __init__(
        self, config: CorrectionConfig, sampling: SamplingConfig, eos_token_id: int | None
    ) -> None:
        self.config = config
        self.logits_filter = sampler_logits_filter(sampling, eos_token_id)
        self.last: RolloutCorrection | None = None
        self._mismatch: dict[str, Tensor] = {}

    def weights(
        self,
        exp: Experience,
        score: Callable[..., Tensor],
    ) -> Tensor:
        """``[N, T]`` weights of ``exp``'s response tokens. ``score(logits_filter=...)`` returns
        the trainer's log-probs of the sampled tokens (at the sampling temperature); with a plain
        softmax sampler the old log-probs already are the target and nothing is re-scored."""
        if self.logits_filter is None and exp.old_logprobs is not None:
            target = exp.old_logprobs
        else:
            target = score(logits_filter=self.logits_filter)
        mask = exp.response_mask
        self.last = rollout_correction(
            target, exp.behaviour_logprobs, mask, **self.config.options()
        )
        self._mismatch = mismatch_kl(target, exp.behaviour_logprobs, mask)
        return self.last.weights.float()

    def metrics(self, exp: Experience) -> dict[str, Tensor]:
        """The weights' and the mismatch's statistics for the last :meth:`weights`."""
        if self.last is None or exp.is_weights is None:
            return {}
        mask = exp.response_mask
        weights = exp.is_weights
        tokens = mask.sum().clamp_min(1)
        limited = self.last.limited
        units = mask.any(dim=-1) if limited.dim() == 1 else mask
        share = (limited & units).sum() / units.sum().clamp_min(1)
        name = "truncated" if self.config.mode == "truncate" else "masked"
        return {
            "rollout/is_weight_mean": torch.where(mask, weights, 0.0).sum() / tokens,
            "sampling/is_weight_max": torch.where(mask, weights, 0.0).max(),
            "sampling/ess": effective_sample_size(weights, mask.float()) / tokens,
            f"rollout/is_{name}_frac": share.float(),
            "rollout/mismatch_kl_k1": self._mismatch["k1"].float(),
            "rollout/mismatch_kl_k3": self._mismatch["k3"].float(),
        }
