"""The experience side of the policy-gradient trainer: whether the rollout is exactly on-policy
(and so whether the behaviour log-probs stand for pi_old, and whether importance weights apply),
the log-probs of a model on the sampled responses, the advantages and returns of the configured
estimator, DAPO's overlong punishment, and the rollout's metrics.

:class:`PolicyGradientExperience` is the part of
:class:`~alignkit.trainers.pg.PolicyGradientTrainer` that does this; ``make_experience`` (in
``trainers/pg.py``) calls it in the order of the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from alignkit.models.forward import token_logprobs
from alignkit.ops.advantages import zero_std_fraction
from alignkit.ops.shaping import overlong_penalty
from alignkit.ops.stats import Moments, masked_whiten
from alignkit.rollout import Experience
from alignkit.trainers.online import applicable

__all__ = ["PolicyGradientExperience"]


def _batch(exp: Experience) -> dict[str, Tensor]:
    return {"input_ids": exp.input_ids, "attention_mask": exp.attention_mask}


class PolicyGradientExperience:
    """Experience-making steps of :class:`~alignkit.trainers.pg.PolicyGradientTrainer` (see the
    module doc); they read the trainer's config, engine, estimator and components."""

    @property
    def exactly_on_policy(self) -> bool:
        """One optimizer step per iteration on samples drawn from the policy's own
        distribution: the update is exactly on-policy."""
        return (
            self.optimizer_steps_per_iteration == 1
            and self.engine_samples_policy
            and self.config.train.epochs_per_iteration == 1
            and not self.stale_rollouts
        )

    @property
    def stale_rollouts(self) -> bool:
        """``rollout.max_staleness: 1``: a batch may come from the policy one update back, so
        it is re-scored and importance-weighted like any sampler that is not the trainer."""
        return bool(self.config.rollout.max_staleness)

    @property
    def behaviour_is_old_policy(self) -> bool:
        """The recorded behaviour log-probs can stand for pi_old in every mini-batch and epoch.

        pi_old is the policy that sampled the iteration, whatever the number of updates after
        it, so re-scoring only corrects the numerical gap between the decode path and the
        training forward: ~1e-6 in fp32 (the engine's log-probs equal a re-scoring forward to
        1e-5, tested), but under bf16 a mean of 2e-3 (tiny preset) to 4e-2 nats (SmolLM2-135M),
        up to 0.23, so bf16 re-scores: the re-score equals the training forward in a padded
        layout and to ~1e-7 on average (1e-2 at most) in a packed one, whose layout moves with
        a micro-batch's rows (verl recomputes for the same reason). Exactly on-policy, the loss
        takes the training forward's own log-probs, detached (:meth:`policy_objective`).
        """
        if self.corrects_behaviour:
            return False
        return self.exactly_on_policy or self.precision.name == "fp32"

    @property
    def corrects_behaviour(self) -> bool:
        """Importance weights apply: the engine's samples or its numbers are not the trainer's
        (a teacher, a truncated sampler, another process such as vLLM), as it declares, or
        they are an older policy's (asynchronous generation)."""
        own = self.engine_samples_policy and self.engine.logprobs_match_trainer
        return not own or self.stale_rollouts

    @property
    def engine_samples_policy(self) -> bool:
        """The engine draws from the distribution the trainer scores (logits / T, no top-k or
        top-p truncation, no teacher), as it declares; otherwise importance weights correct
        the mismatch."""
        return self.engine.samples_policy(self.sampling)

    @torch.no_grad()
    def score_logprobs(
        self,
        model: nn.Module,
        exp: Experience,
        logits_filter: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """``[N, T]`` log-probs of the response tokens under `model` (at the sampling T; under
        the sampler's truncation with a ``logits_filter``)."""
        parts = [
            token_logprobs(
                model,
                _batch(chunk),
                chunk.response_mask,
                temperature=self.sampling.temperature,
                packed=self.config.model.packed,
                logits_filter=logits_filter,
            ).float()
            for chunk in exp.split(self.config.train.sequences_per_device)
        ]
        return torch.cat(parts)

    def estimate(
        self, exp: Experience, token_rewards: Tensor, values: Tensor | None, scores: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Advantages and returns of the configured estimator (whitened when set); rows whose
        score is NaN (not applicable) are left out of its statistics and get 0. Statistics
        over the batch (REINFORCE's, REINFORCE++'s, the whitening) span every process."""
        cfg = self.config.advantage
        rows = torch.isfinite(scores).nonzero().squeeze(1)
        mask = exp.response_mask[rows]
        reduce = self._global_moments if self.accelerator.num_processes > 1 else None
        a, r = self.estimator(
            token_rewards=token_rewards[rows],
            mask=mask,
            values=values[rows] if values is not None else None,
            group_index=exp.group_index[rows],
            reduce_moments=reduce,
            **cfg.estimator_settings(),
        )
        if cfg.whiten:
            a = masked_whiten(a, mask, reduce_moments=reduce)
        advantages = torch.zeros_like(token_rewards)
        returns = torch.zeros_like(token_rewards)
        advantages[rows], returns[rows] = a.float(), r.float()
        return advantages, returns

    def shape_scores(self, exp: Experience) -> Tensor:
        """The scores plus DAPO's soft overlong punishment (NaN scores stay NaN)."""
        penalty = self.overlong_penalty(exp)
        return exp.scores if penalty is None else exp.scores + penalty

    def overlong_penalty(self, exp: Experience) -> Tensor | None:
        """``[N]`` ``ops.shaping.overlong_penalty`` when ``reward.overlong_buffer`` is set."""
        shaping = self.config.reward
        if shaping.overlong_buffer is None:
            return None
        factor = 1.0 if shaping.overlong_penalty is None else shaping.overlong_penalty
        limit = self.config.rollout.max_new_tokens
        penalty = overlong_penalty(exp.response_lengths, limit, shaping.overlong_buffer, factor)
        return penalty.to(exp.scores)

    def _global_moments(self, moments: Moments) -> Moments:
        """The moments of every process' batch together (an all-reduce: all processes call)."""
        return Moments.from_tensor(self.accelerator.reduce(moments.tensor(), reduction="sum"))

    def experience_metrics(self, exp: Experience) -> dict[str, Tensor]:
        mask = exp.response_mask
        scores = exp.scores
        scored = applicable(scores)
        metrics: dict[str, Tensor] = {
            "reward/mean": scored.mean() if scored.numel() else scores.new_zeros(()),
            "reward/zero_std_frac": zero_std_fraction(scores, exp.group_index),
            "response_length/mean": exp.response_lengths.float().mean(),
            "response_length/clipped_ratio": exp.truncated.float().mean(),
        }
        metrics.update(self.source_stats.metrics(self.state.step, self.accelerator))
        for name, value in self.reward_log.metric_means(self.state.step).items():
            metrics[name] = torch.tensor(value, device=scores.device)  # reward fns' log_metric
        metrics.update(self.kl.metrics(exp))
        if self.critic is not None:
            metrics.update(self.critic.metrics(exp.values, exp.returns, mask))
        # What only the engine knows (a teacher mixture's alpha and fallback share, how far its
        # weights lagged); the importance weights are the trainer's own, computed once above.
        for name, value in self.engine_stats.items():
            metrics[name] = torch.tensor(float(value), device=scores.device)
        metrics.update(self.correction.metrics(exp))
        penalty = self.overlong_penalty(exp)
        if penalty is not None:
            metrics["reward/overlong_penalty"] = penalty.mean()
        return metrics
