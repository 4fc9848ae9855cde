"""One policy-gradient trainer; PPO, GRPO, RLOO, REINFORCE++ and REINFORCE are presets of it.

Per iteration (``make_experience``)::

    exp            = engine.generate(prompts)                 # ids, masks, behaviour log-probs
    exp.scores     = rewards(prompts, completions, **row_fields)
    exp.old        = behaviour log-probs   if exactly on-policy (1 epoch, 1 mini-batch, own engine)
                     else policy.logprobs(exp)                # + truncated IS weights if mu != pi
    exp.reference  = reference.logprobs(exp)                  # only when kl.coef > 0
    exp.values     = critic(exp)                              # PPO only
    token_rewards  = score on the last response token (- beta * KL_t when kl.placement=reward)
    exp.advantages, exp.returns = estimator(token_rewards, mask, values, group_index, ...)

and per mini-batch (``optimize``), one optimizer step of the policy (and one of the critic)::

    loss = policy_loss(logp, old, A, mask, weights=is_weights, agg, normaliser=N)
           - entropy_coef * token-mean entropy + beta * KL loss   (kl.placement=loss)

with N the whole step's token (or sequence) count, so the gradient does not depend on how the
mini-batch is split into micro-batches. The pieces are components: the policy loss and the
estimator come from the ``ops`` registries, the KL term is a ``KLPenalty``
(``trainers/kl_penalty.py``), the critic a ``Critic`` (``trainers/critic.py``), and
``OptimizerStep`` weights every metric over the step. Methods map onto it through
``trainers/registry.py`` presets (advantage estimator, critic, policy loss); nothing is copied
per method.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.models import load_policy
from alignkit.models.forward import token_logprobs
from alignkit.models.reward import RewardModel
from alignkit.ops.advantages import get_advantage_estimator, terminal_rewards, zero_std_fraction
from alignkit.ops.importance import effective_sample_size, truncated_importance_weights
from alignkit.ops.losses import aggregate_loss, aggregation_units, get_policy_loss
from alignkit.ops.stats import Moments, masked_whiten
from alignkit.rollout import (
    Experience,
    GenerationEngine,
    Prompt,
    TeacherGuidedEngine,
    generate_batched,
    load_prompt_file,
)
from alignkit.rollout.rewards import RewardSource, build_reward_source
from alignkit.trainers.common import load_model_and_tokenizer
from alignkit.trainers.critic import Critic, as_critic, build_critic
from alignkit.trainers.kl_penalty import KLPenalty
from alignkit.trainers.online import OnlineTrainer
from alignkit.trainers.reward import load_reward_checkpoint
from alignkit.trainers.rl_config import PGConfig

__all__ = ["PolicyGradientTrainer", "build_critic", "build_pg_trainer", "train_pg"]

#: The policy loss' statistics under their logged names (others: ``actor/<name>``).
_STAT_NAMES = {"clipfrac": "actor/pg_clipfrac", "approx_kl": "actor/ppo_kl"}


def _batch(exp: Experience) -> dict[str, Tensor]:
    return {"input_ids": exp.input_ids, "attention_mask": exp.attention_mask}


class PolicyGradientTrainer(OnlineTrainer):
    """See the module docstring."""

    progress_metrics = ("reward/mean", "kl/mean", "response_length/mean")

    def __init__(
        self,
        config: PGConfig,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        reward: RewardSource,
        *,
        engine: GenerationEngine | None = None,
        eval_prompts: Sequence[Prompt] | None = None,
        critic: nn.Module | Critic | None = None,
    ) -> None:
        """`critic`: the value model (wrapped in a :class:`Critic` with ``config.critic``'s
        settings), or a Critic; needed exactly when the estimator uses values."""
        super().__init__(
            config, model, tokenizer, prompts, reward, engine=engine, eval_prompts=eval_prompts
        )
        self.config: PGConfig = config
        self.estimator = get_advantage_estimator(config.advantage.resolved_estimator)
        self.policy_loss = get_policy_loss(config.policy_loss.name)
        self.policy_loss_settings = self._policy_loss_settings()
        self.critic = as_critic(critic, config.critic, name="critic", prefix="critic")
        if "values" in self.estimator.needs and self.critic is None:
            raise ValueError(f"advantage estimator {self.estimator.name!r} needs a critic")
        self.kl = KLPenalty(config.kl)
        self.register_controller("kl", self.kl.controller)
        self.last_lr = config.optim.lr
        self._engine_weights_step: int | None = None  # the iteration the engine's copy is of

    def _policy_loss_settings(self) -> dict[str, Any]:
        """The ``policy_loss`` config fields that the loss takes by name (clip ratios for
        ppo_clip): a new loss reads a new field by naming it as a keyword parameter."""
        offered = dataclasses.asdict(self.config.policy_loss)
        accepted = inspect.signature(self.policy_loss).parameters
        # The trainer passes these itself, per micro-batch.
        given = {"logp", "old_logp", "advantages", "mask", "weights", "agg", "normaliser"}
        return {k: v for k, v in offered.items() if k in accepted and k not in given}

    # ----------------------------------------------------------------- set-up

    def _prepare_training(self) -> None:
        super()._prepare_training()
        self.kl.prepare(self, self.config.reference, dtype=self.config.model.dtype)
        if self.critic is not None:
            self.critic.prepare(self)

    def restore_model_weights(self, model: nn.Module, directory: Path) -> None:
        if isinstance(model, RewardModel):
            load_reward_checkpoint(model, directory)
        else:
            super().restore_model_weights(model, directory)

    @property
    def exactly_on_policy(self) -> bool:
        """One optimizer step per iteration on samples drawn from the policy's own
        distribution: the update is exactly on-policy."""
        return (
            self.optimizer_steps_per_iteration == 1
            and self.engine_samples_policy
            and self.config.train.epochs_per_iteration == 1
        )

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
        if not (self.engine_samples_policy and self.engine.logprobs_match_trainer):
            return False
        return self.exactly_on_policy or self.precision.name == "fp32"

    @property
    def engine_samples_policy(self) -> bool:
        """The engine draws from the distribution the trainer scores (logits / T, no top-k or
        top-p truncation, no teacher), as it declares; otherwise importance weights correct
        the mismatch."""
        return self.engine.samples_policy(self.sampling)

    def _engine_current(self) -> None:
        """An engine with its own copy of the weights gets this iteration's policy, once."""
        if self.engine.needs_weight_sync and self._engine_weights_step != self.state.step:
            with self.timed("weight_sync"):
                self.engine.sync_weights(self.model)
            self._engine_weights_step = self.state.step

    # ----------------------------------------------------------------- experience

    @torch.no_grad()
    def score_logprobs(self, model: nn.Module, exp: Experience) -> Tensor:
        """``[N, T]`` log-probs of the response tokens under `model` (at the sampling T)."""
        parts = [
            token_logprobs(
                model,
                _batch(chunk),
                chunk.response_mask,
                temperature=self.sampling.temperature,
                packed=self.config.model.packed,
            ).float()
            for chunk in exp.split(self.config.train.sequences_per_device)
        ]
        return torch.cat(parts)

    def make_experience(
        self, prompts: Sequence[Prompt], group_offset: int, generator: torch.Generator
    ) -> Experience:
        cfg = self.config
        device = self.accelerator.device
        self._engine_current()
        self.engine.set_iteration(self.state.step)
        with self.timed("rollout"):
            exp = self.engine.generate(
                prompts, self.sampling, generator=generator, group_offset=group_offset
            ).to(device)
        with self.timed("reward"):
            exp.scores = self.reward(exp.prompts, exp.completions, exp.row_fields).to(device)
        with self.timed("old_logprobs"):
            if self.behaviour_is_old_policy:
                exp.old_logprobs = exp.behaviour_logprobs
            else:
                exp.old_logprobs = self.score_logprobs(self.model, exp)
            if not self.engine_samples_policy:
                exp.is_weights = truncated_importance_weights(
                    exp.old_logprobs, exp.behaviour_logprobs, cfg.rollout.max_importance_weight
                )
        if self.kl.enabled:
            with self.timed("reference"):
                exp.reference_logprobs = self.kl.reference_logprobs(exp, self.score_logprobs)
        if self.critic is not None:
            with self.timed("values"):
                exp.values = self.critic.values(exp)
        with self.timed("advantage"):
            exp.token_rewards = self.kl.shape_rewards(
                terminal_rewards(exp.scores, exp.response_mask), exp
            )
            exp.advantages, exp.returns = self.estimate(
                exp, exp.token_rewards, exp.values, exp.scores
            )
        return exp

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
            gamma=cfg.gamma,
            lam=cfg.lam,
            reduce_moments=reduce,
        )
        if cfg.whiten:
            a = masked_whiten(a, mask, reduce_moments=reduce)
        advantages = torch.zeros_like(token_rewards)
        returns = torch.zeros_like(token_rewards)
        advantages[rows], returns[rows] = a.float(), r.float()
        return advantages, returns

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
        metrics.update(self.kl.metrics(exp))
        if self.critic is not None:
            metrics.update(self.critic.metrics(exp.values, exp.returns, mask))
        # What only the engine knows (a teacher mixture's alpha and fallback share); the
        # importance weights are the trainer's own, computed once above.
        for name, value in self.engine.stats().items():
            metrics[name] = torch.tensor(float(value), device=scores.device)
        if exp.is_weights is not None:
            metrics["sampling/is_weight_max"] = torch.where(mask, exp.is_weights, 0.0).max()
            ess = effective_sample_size(exp.is_weights, mask.float())
            metrics["sampling/ess"] = ess / mask.sum().clamp_min(1)
        return metrics

    def after_iteration(self, metrics: Mapping[str, Tensor]) -> dict[str, float]:
        sequences = self.config.rollout.sequences_per_iteration
        return {"lr": self.last_lr, **self.kl.after_iteration(metrics, sequences)}

    # ----------------------------------------------------------------- update

    def optimize(self, minibatch: Experience) -> dict[str, Tensor]:
        """One optimizer step of the policy on `minibatch` (and one of the critic)."""
        micro = minibatch.split(self.config.train.sequences_per_device)
        step = self.state.step + 1
        # The entropy and the loss' statistics are token means over the whole step (all
        # processes), whatever unit the policy loss averages over.
        tokens = self.policy_step.global_units([self.loss_mask(m).sum() for m in micro])
        loss_fn = partial(self.policy_objective, tokens=tokens)
        outcome = self.policy_step.run(micro, loss_fn, self._units, step=step)
        self.last_lr = outcome.lr
        metrics = dict(outcome.metrics)
        if outcome.grad_norm is not None:
            metrics["grad_norm"] = outcome.grad_norm.detach().float()
        if self.critic is not None:
            values, returns = [m.values for m in micro], [m.returns for m in micro]
            metrics.update(self.critic.update(micro, values, returns, step=step))
        return metrics

    def policy_objective(
        self, batch: Experience, units: Tensor, *, tokens: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's share of ``L = policy_loss - c_H * H + beta * KL`` (the step's
        sums over N `units`; H and the statistics over the step's `tokens`), and of its
        metrics."""
        cfg = self.config.policy_loss
        mask = self.loss_mask(batch)
        logp, entropy = token_logprobs(
            self.model,
            _batch(batch),
            batch.response_mask,
            temperature=self.sampling.temperature,
            with_entropy=True,
            packed=self.config.model.packed,
        )
        if self.exactly_on_policy:
            # pi_old is the policy of this very forward: its own log-probs, detached, make the
            # ratio exactly 1, where the engine's differ by numerics (bf16 on SmolLM2: mean
            # 0.04, up to 0.23 nats, beyond the clip range). TRL's GRPO does the same.
            batch = dataclasses.replace(batch, old_logprobs=logp.detach())
        pg, stats = self.policy_loss(
            logp,
            batch.old_logprobs,
            batch.advantages,
            mask,
            weights=batch.is_weights,
            agg=cfg.agg,
            normaliser=units,
            **self.policy_loss_settings,
        )
        entropy = aggregate_loss(entropy, mask, "token-mean", normaliser=tokens)
        loss = pg
        if cfg.entropy_coef:  # at 0 the entropy is a metric: no backward through it
            loss = loss - cfg.entropy_coef * entropy
        metrics = {"actor/pg_loss": pg, "actor/entropy": entropy}
        kl = self.kl.loss_term(logp, batch, mask, cfg.agg, units)
        if kl is not None:
            loss = loss + self.kl.coef * kl
            metrics["actor/kl_loss"] = kl
        share = mask.sum() / tokens  # the statistics are token means of this micro-batch
        for name, value in stats.items():
            metrics[_STAT_NAMES.get(name, f"actor/{name}")] = value * share
        return loss, metrics

    def loss_mask(self, batch: Experience) -> Tensor:
        """``[N, T]`` the tokens the policy loss is taken on, counted by the step's normaliser
        and its token means: the response tokens."""
        return batch.response_mask

    def _units(self, batch: Experience) -> Tensor:
        """Loss units of a micro-batch: what the policy loss' ``agg`` averages over."""
        max_tokens = self.config.rollout.max_new_tokens
        agg = self.config.policy_loss.agg
        return aggregation_units(self.loss_mask(batch), agg, max_tokens=max_tokens)

    # ----------------------------------------------------------------- evaluation

    def _has_evaluation(self) -> bool:
        return bool(self.eval_prompts)

    def evaluate(self) -> dict[str, float]:
        """Greedy completions of the held-out prompts: mean reward, and accuracy = the share
        that earn the full reward (>= 1, the exact answer of a verifiable task)."""
        scores = applicable(self.score_eval_generations(self.reward))
        return {
            "eval/reward": float(scores.mean()),
            "eval/accuracy": float((scores >= 1).float().mean()),
        }

    def score_eval_generations(self, *sources: RewardSource) -> Tensor:
        """``[len(sources), N]``: each source's scores of one greedy completion per held-out
        prompt (generated once, all prompts in one batch)."""
        self._engine_current()
        greedy = dataclasses.replace(self.sampling, samples_per_prompt=1, temperature=0.0)
        prompts = self.eval_prompts
        exp = generate_batched(
            self.engine,
            prompts,
            greedy,
            prompts_per_batch=len(prompts),
            generator=torch.Generator(),
        )
        return torch.stack(
            [source(exp.prompts, exp.completions, exp.row_fields) for source in sources]
        )


def applicable(scores: Tensor) -> Tensor:
    """The scores that are not NaN ("not applicable")."""
    return scores[torch.isfinite(scores)]


# --------------------------------------------------------------------------------------
# Building from a config


def build_pg_trainer(
    cfg: PGConfig,
    trainer_class: type[PolicyGradientTrainer] = PolicyGradientTrainer,
    extra: Callable[[Any], dict[str, Any]] | None = None,
) -> PolicyGradientTrainer:
    """Load the policy, prompts, reward sources and critic; return the trainer.

    ``extra(tokenizer)`` gives a subclass' own constructor arguments (Safe-PPO's costs)."""
    from alignkit.errors import ConfigError

    if not cfg.data.train_file:
        raise ConfigError(
            "data.train_file is required (a prompt file, e.g. data/sort_prompts.jsonl)"
        )
    if not cfg.rewards:
        raise ConfigError("rewards: give at least one source, e.g. [{function: sort_match}]")
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
    data = cfg.data
    prompts = load_prompt_file(data.train_file, tokenizer, data.max_prompt_length)
    eval_prompts = (
        load_prompt_file(
            data.eval_file, tokenizer, data.max_prompt_length, limit=data.max_eval_prompts
        )
        if data.eval_file
        else None
    )
    reward = build_reward_source([s.spec() for s in cfg.rewards], tokenizer=tokenizer)
    engine = None
    if cfg.rollout.teacher:
        teacher, teacher_tokenizer = load_policy(cfg.rollout.teacher, dtype=cfg.model.dtype)
        engine = TeacherGuidedEngine(
            model,
            teacher,
            tokenizer,
            alpha=cfg.rollout.alpha,
            teacher_tokenizer=teacher_tokenizer,
            floor=cfg.rollout.teacher_floor,
        )
    critic = build_critic(cfg, cfg.critic) if cfg.critic is not None else None
    return trainer_class(
        cfg,
        model,
        tokenizer,
        prompts,
        reward,
        engine=engine,
        eval_prompts=eval_prompts,
        critic=critic,
        **(extra(tokenizer) if extra is not None else {}),
    )


def train_pg(cfg: PGConfig) -> dict[str, Any]:
    """Run a policy-gradient method (ppo, grpo, rloo, reinforce++, reinforce)."""
    return build_pg_trainer(cfg).train()
