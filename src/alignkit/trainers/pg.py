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
mini-batch is split into micro-batches. Methods map onto it through ``trainers/registry.py``
presets (advantage estimator, critic, policy loss); nothing is copied per method.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.models import disabled_adapter, has_adapter, load_policy
from alignkit.models.forward import token_logprobs
from alignkit.models.reward import RewardModel, load_reward_model
from alignkit.ops.advantages import get_advantage_estimator
from alignkit.ops.importance import effective_sample_size, truncated_importance_weights
from alignkit.ops.kl import AdaptiveKLController, FixedKLController, apply_kl_penalty, kl_estimate
from alignkit.ops.kl import kl_loss as kl_loss_values
from alignkit.ops.losses import aggregate_loss, get_policy_loss, value_loss
from alignkit.ops.stats import explained_variance, masked_mean, masked_whiten
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
from alignkit.trainers.online import OnlineTrainer, disable_dropout
from alignkit.trainers.reward import load_reward_checkpoint
from alignkit.trainers.rl_config import CriticConfig, PGConfig

__all__ = ["PolicyGradientTrainer", "build_critic", "build_pg_trainer", "train_pg"]

#: pi/pi_old weighting the KL term: untruncated in effect (the log-ratio is clamped at +-20).
RATIO_CAP = math.exp(20.0)


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
        critic: nn.Module | None = None,
    ) -> None:
        super().__init__(
            config, model, tokenizer, prompts, reward, engine=engine, eval_prompts=eval_prompts
        )
        self.config: PGConfig = config
        self.estimator = get_advantage_estimator(config.advantage.resolved_estimator)
        self.policy_loss = get_policy_loss(config.policy_loss.name)
        self.policy_loss_settings = self._policy_loss_settings()
        self.critic = critic
        if critic is not None:
            disable_dropout(critic)  # its values are regression targets of the same states
        if "values" in self.estimator.needs and critic is None:
            raise ValueError(f"advantage estimator {self.estimator.name!r} needs a critic")
        kl = config.kl
        self.kl_controller = (
            AdaptiveKLController(kl.coef, kl.target, kl.horizon, kl.rule)
            if kl.controller == "adaptive"
            else FixedKLController(kl.coef)
        )
        self.register_controller("kl", self.kl_controller)
        self.reference: nn.Module | None = None
        self.last_lr = config.optim.lr
        self._engine_weights_step: int | None = None  # the iteration the engine's copy is of

    def _policy_loss_settings(self) -> dict[str, Any]:
        """The loss' own keyword settings that the config has (clip ratios for ppo_clip)."""
        pl = self.config.policy_loss
        offered = {
            "clip_ratio": pl.clip_ratio,
            "clip_ratio_high": pl.clip_ratio_high,
            "dual_clip": pl.dual_clip,
        }
        accepted = inspect.signature(self.policy_loss).parameters
        return {k: v for k, v in offered.items() if k in accepted}

    # ----------------------------------------------------------------- set-up

    def _prepare_training(self) -> None:
        super()._prepare_training()
        cfg = self.config
        if cfg.kl.enabled:
            self.reference = self._build_reference()
        if self.critic is not None:
            critic_optim = dataclasses.replace(cfg.optim, lr=cfg.critic.lr)
            self.register_model("critic", self.critic)
            self.critic, self.critic_step = self.build_optimizer_for(
                "critic", self.critic, critic_optim
            )

    def _build_reference(self) -> nn.Module | None:
        """A separate frozen model, or None: the adapter-less policy (LoRA) is used in place."""
        cfg = self.config
        if cfg.reference:
            model, _ = load_policy(cfg.reference, dtype=cfg.model.dtype)
            return self.prepare_frozen(model)
        if has_adapter(self.unwrapped_model):
            return None
        # The initial policy: a frozen copy taken before the first update.
        return self.prepare_frozen(copy.deepcopy(self.unwrapped_model))

    def restore_model_weights(self, model: nn.Module, directory: Path) -> None:
        if isinstance(model, RewardModel):
            load_reward_checkpoint(model, directory)
        else:
            super().restore_model_weights(model, directory)

    @contextmanager
    def _reference_model(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
            return
        with disabled_adapter(self.unwrapped_model):
            yield self.model

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
        1e-5, tested), but up to ~1e-2 under bf16 autocast, where a re-score keeps the first
        ratio at exactly 1 (verl recomputes for the same reason).
        """
        if not (self.engine_samples_policy and self.engine.logprobs_match_trainer):
            return False
        return self.exactly_on_policy or self.config.precision == "fp32"

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

    @torch.no_grad()
    def critic_values(self, critic: nn.Module, exp: Experience) -> Tensor:
        """``[N, T]`` V(s_t) for each response token t: the head at position t - 1, the state
        before the token was emitted (aligned like the log-probs)."""
        return torch.cat([self._values(critic, chunk) for chunk in exp.split(self._chunk())])

    def _chunk(self) -> int:
        return self.config.train.sequences_per_device

    def _values(self, critic: nn.Module, exp: Experience) -> Tensor:
        out = critic(exp.input_ids, exp.attention_mask, return_token_values=True).token_values
        shifted = torch.cat([out.new_zeros(out.shape[0], 1), out[:, :-1]], dim=1).float()
        return torch.where(exp.response_mask, shifted, 0.0)

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
        if cfg.kl.enabled:
            with self.timed("reference"), self._reference_model() as reference:
                exp.reference_logprobs = self.score_logprobs(reference, exp)
        if self.critic is not None:
            with self.timed("values"):
                exp.values = self.critic_values(self.critic, exp)
        with self.timed("advantage"):
            self._advantages(exp)
        return exp

    def _advantages(self, exp: Experience) -> None:
        """Token rewards (score on the last response token, KL penalty when placed in the
        reward), then the estimator; rows whose score is NaN (not applicable) are left out of
        its statistics and get advantage 0."""
        cfg = self.config
        mask = exp.response_mask
        token_scores = self.token_scores(exp, exp.scores)
        token_rewards = token_scores
        if cfg.kl.enabled and cfg.kl.placement == "reward":
            token_rewards, _ = apply_kl_penalty(
                token_scores,
                exp.old_logprobs,
                exp.reference_logprobs,
                mask,
                self.kl_controller.value,
                cfg.kl.resolved_estimator,
            )
        advantages, returns = self.estimate(exp, token_rewards, exp.values, exp.scores)
        exp.token_rewards, exp.advantages, exp.returns = token_rewards, advantages, returns

    @staticmethod
    def token_scores(exp: Experience, scores: Tensor) -> Tensor:
        """``[N, T]``: each sequence score on its last response token (NaN scores as 0)."""
        last = (exp.prompt_width + exp.response_lengths - 1).clamp(min=0)
        token_scores = torch.zeros_like(exp.old_logprobs)
        token_scores[torch.arange(len(exp)), last] = torch.nan_to_num(scores, nan=0.0)
        return token_scores

    def estimate(
        self, exp: Experience, token_rewards: Tensor, values: Tensor | None, scores: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Advantages and returns of the configured estimator (whitened when set); rows whose
        score is NaN are left out of its statistics and get 0."""
        cfg = self.config
        mask = exp.response_mask
        rows = torch.isfinite(scores).nonzero().squeeze(1)
        inputs: dict[str, Any] = {
            "token_rewards": token_rewards[rows],
            "mask": mask[rows],
            "values": values[rows] if values is not None else None,
            "group_index": exp.group_index[rows],
            "gamma": cfg.advantage.gamma,
            "lam": cfg.advantage.lam,
        }
        advantages = torch.zeros_like(token_rewards)
        returns = torch.zeros_like(token_rewards)
        if rows.numel():
            a, r = self.estimator(**inputs)
            if cfg.advantage.whiten:
                a = masked_whiten(a, mask[rows])
            advantages[rows], returns[rows] = a.float(), r.float()
        return advantages, returns

    def experience_metrics(self, exp: Experience) -> dict[str, Tensor]:
        mask = exp.response_mask
        scores = exp.scores
        applicable = torch.isfinite(scores)
        metrics: dict[str, Tensor] = {
            "reward/mean": scores[applicable].mean() if applicable.any() else scores.new_zeros(()),
            "reward/zero_std_frac": _zero_std_fraction(scores, exp.group_index),
            "response_length/mean": exp.response_lengths.float().mean(),
            "response_length/clipped_ratio": exp.truncated.float().mean(),
        }
        if exp.reference_logprobs is not None:
            # A value estimate of KL(pi || ref) on the sampled tokens, whatever the placement.
            k1 = kl_estimate(exp.old_logprobs, exp.reference_logprobs, "k1")
            metrics["kl/mean"] = masked_mean(k1, mask)
        if exp.values is not None:
            metrics["critic/vf_explained_var"] = explained_variance(exp.values, exp.returns, mask)
            metrics["critic/values_mean"] = masked_mean(exp.values, mask)
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
        values = {"lr": self.last_lr}
        if self.config.kl.enabled:
            coef_used = self.kl_controller.value
            self.kl_controller.update(
                float(metrics["kl/mean"]), self.config.rollout.sequences_per_iteration
            )
            values["kl/coef"] = coef_used
        return values

    # ----------------------------------------------------------------- update

    def _units(self, batch: Experience) -> Tensor:
        """Loss units of a micro-batch: response tokens (token-mean) or sequences."""
        mask = batch.response_mask
        if self.config.policy_loss.agg == "token-mean":
            return mask.sum()
        return (mask.sum(dim=1) > 0).sum()

    def optimize(self, minibatch: Experience) -> dict[str, Tensor]:
        cfg = self.config
        micro = minibatch.split(cfg.train.sequences_per_device)
        step = self.policy_step
        # Token count of the whole step (all processes), for the entropy bonus and the
        # statistics, whatever unit the policy loss averages over.
        tokens = step.global_units([m.response_mask.sum() for m in micro])
        local_tokens = sum(m.response_mask.sum() for m in micro).clamp_min(1)
        # Metrics are sums of per-micro-batch parts: weights local to this process, so that
        # the mean over processes is the step's value.
        processes = self.accelerator.num_processes
        sums: dict[str, Tensor] = {}

        def add(name: str, value: Tensor) -> None:
            sums[name] = sums.get(name, 0.0) + value.detach().float()

        def loss_fn(batch: Experience, units: Tensor) -> Tensor:
            mask = batch.response_mask
            logp, entropy = token_logprobs(
                self.model,
                _batch(batch),
                mask,
                temperature=self.sampling.temperature,
                with_entropy=True,
                packed=self.config.model.packed,
            )
            agg, normaliser = self._aggregation(units)
            pg, stats = self.policy_loss(
                logp,
                batch.old_logprobs,
                batch.advantages,
                mask,
                weights=batch.is_weights,
                agg=agg,
                normaliser=normaliser,
                **self.policy_loss_settings,
            )
            share = mask.sum() / local_tokens  # this micro-batch's share of the process' tokens
            entropy_mean = aggregate_loss(entropy, mask, "token-mean", normaliser=tokens)
            loss = pg
            if cfg.policy_loss.entropy_coef:  # at 0 the entropy is a metric: no backward
                loss = loss - cfg.policy_loss.entropy_coef * entropy_mean
            if cfg.kl.enabled and cfg.kl.placement == "loss":
                # Weighted by pi/pi_old (detached): the KL gradient identities hold for samples
                # of pi, and after the first update the samples are pi_old's (TRL #3025).
                ratio = truncated_importance_weights(logp, batch.old_logprobs, RATIO_CAP)
                if batch.is_weights is not None:  # samples of mu, not pi_old: pi_old/mu too
                    ratio = ratio * batch.is_weights
                kl_tokens = kl_loss_values(
                    logp, batch.reference_logprobs, cfg.kl.resolved_estimator
                )
                kl_term = aggregate_loss(kl_tokens * ratio, mask, agg, normaliser=normaliser)
                loss = loss + self.kl_controller.value * kl_term
                add("actor/kl_loss", kl_term * processes)
            # pg and entropy_mean are this micro-batch's part of the step value (sum / N).
            add("actor/pg_loss", pg * processes)
            add("actor/entropy", entropy_mean * processes)
            for name, value in stats.items():
                metric = {"clipfrac": "actor/pg_clipfrac", "approx_kl": "actor/ppo_kl"}.get(
                    name, f"actor/{name}"
                )
                add(metric, value * share)
            return loss

        outcome = step.run(micro, loss_fn, self._units, step=self.state.step + 1)
        self.last_lr = outcome.lr
        metrics = dict(sums)
        if outcome.grad_norm is not None:
            metrics["grad_norm"] = outcome.grad_norm.detach().float()
        if self.critic is not None:
            metrics.update(self._optimize_critic(micro))
        return metrics

    def _aggregation(self, units: Tensor) -> tuple[str, Tensor]:
        """``aggregate_loss`` mode and normaliser. Dr. GRPO's constant normaliser is
        ``seq-mean-token-sum`` over N sequences times L = max_new_tokens: each sequence's
        token sum divided by the constant L, averaged over the step's sequences."""
        agg = self.config.policy_loss.agg
        if agg == "seq-mean-token-sum-norm":
            return "seq-mean-token-sum", units * self.config.rollout.max_new_tokens
        return agg, units

    def _optimize_critic(
        self,
        micro: list[Experience],
        critic: nn.Module | None = None,
        critic_step: Any = None,
        cfg: CriticConfig | None = None,
        prefix: str = "critic",
    ) -> dict[str, Tensor]:
        """One optimizer step of a critic (the reward critic unless given) towards the
        micro-batches' ``returns``, clipped around their ``values``; metrics under `prefix`."""
        critic = self.critic if critic is None else critic
        critic_step = self.critic_step if critic_step is None else critic_step
        cfg = self.config.critic if cfg is None else cfg
        processes = self.accelerator.num_processes
        local_tokens = sum(m.response_mask.sum() for m in micro).clamp_min(1)
        sums: dict[str, Tensor] = {}

        def loss_fn(batch: Experience, units: Tensor) -> Tensor:
            mask = batch.response_mask
            values = self._values(critic, batch)
            loss, stats = value_loss(
                values, batch.values, batch.returns, mask, clip=cfg.value_clip, agg="token-mean"
            )
            # token-mean of this micro-batch x its share of the step's tokens = sum / N.
            share = mask.sum() / units
            logged = (loss * share).detach() * processes
            sums[f"{prefix}/vf_loss"] = sums.get(f"{prefix}/vf_loss", 0.0) + logged
            clipfrac = stats["vf_clipfrac"] * mask.sum() / local_tokens
            sums[f"{prefix}/vf_clipfrac"] = sums.get(f"{prefix}/vf_clipfrac", 0.0) + clipfrac
            return cfg.coef * loss * share

        outcome = critic_step.run(
            micro, loss_fn, lambda b: b.response_mask.sum(), step=self.state.step + 1
        )
        if outcome.grad_norm is not None:
            sums[f"{prefix}/grad_norm"] = outcome.grad_norm.detach().float()
        return sums

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


def _zero_std_fraction(scores: Tensor, group_index: Tensor) -> Tensor:
    """Share of groups whose applicable scores are all equal (their advantages are 0)."""
    finite = torch.isfinite(scores)
    if not finite.any():
        return scores.new_ones(())
    values, ids = scores[finite], group_index[finite]
    _, inverse = torch.unique(ids, return_inverse=True)
    groups = int(inverse.max()) + 1
    high = values.new_full((groups,), -torch.inf).scatter_reduce(0, inverse, values, "amax")
    low = values.new_full((groups,), torch.inf).scatter_reduce(0, inverse, values, "amin")
    return (high == low).float().mean()


# --------------------------------------------------------------------------------------
# Building from a config


def build_critic(cfg: PGConfig, critic: CriticConfig) -> nn.Module:
    """A critic as `critic` says: a value head on the policy's backbone, or a model's."""
    name = cfg.model.name if critic.model == "policy" else critic.model
    model, _ = load_reward_model(name, dtype=cfg.model.dtype, seed=cfg.seed)
    model.train()
    return model


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
