"""One policy-gradient trainer; PPO, GRPO, RLOO, REINFORCE++ and REINFORCE are presets of it.

Per iteration (``make_experience``: the sampling, then ``complete_experience``)::

    exp            = engine.generate(prompts)                 # ids, masks, behaviour log-probs
    exp.scores     = rewards(prompts, completions, **row_fields)
    exp.old        = behaviour log-probs   if exactly on-policy (1 epoch, 1 mini-batch, own engine)
                     else policy.logprobs(exp)
    exp.is_weights = rollout.correction(pi_target / mu)       # only if the sampler is not pi
    exp.reference  = reference.logprobs(exp)                  # only when kl.coef > 0
    exp.values     = critic(exp)                              # PPO only
    token_rewards  = score (+ overlong penalty) on the last response token (- beta * KL_t when
                     kl.placement=reward)
    exp.advantages, exp.returns = estimator(token_rewards, mask, values, group_index, ...)

and per mini-batch (``optimize``), one optimizer step of the policy (and one of the critic)::

    mask = loss_mask(exp)                         # response tokens (minus truncated completions)
    keep = top-entropy tokens & off-policy mask   # policy_loss.top_entropy_quantile, ...
    loss = policy_loss(logp, old, A, mask, weights=is_weights * keep, agg, normaliser=N)
           - entropy_coef * token-mean entropy + beta * KL loss   (kl.placement=loss)

with N the whole step's token (or sequence) count, so the gradient does not depend on how the
mini-batch is split into micro-batches. The pieces are components: the policy loss and the
estimator come from the ``ops`` registries, the KL term is a ``KLPenalty``
(``trainers/kl_penalty.py``), the critic a ``Critic`` (``trainers/critic.py``), the loss and
keep masks ``PolicyTokens`` (``trainers/token_masks.py``), and ``OptimizerStep`` weights every
metric over the step. ``rollout.filter_groups`` (DAPO's dynamic sampling) makes an iteration's
batch from several rounds of ``make_experience`` (``OnlineTrainer.collect_experience``); the
advantages are then estimated again over the batch kept (``merge_rounds``). Methods map onto
it through ``trainers/registry.py`` presets (advantage estimator, critic, policy loss); nothing
is copied per method. The steps ``make_experience`` calls (on-policy decisions, scoring
log-probs, the estimator, shaping, the rollout's metrics) are in ``trainers/pg_experience.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from alignkit.models import load_policy
from alignkit.models.forward import token_logprobs
from alignkit.models.reward import RewardModel, load_reward_checkpoint
from alignkit.ops.advantages import get_advantage_estimator, terminal_rewards
from alignkit.ops.losses import aggregate_loss, aggregation_units, get_policy_loss
from alignkit.rollout import (
    Experience,
    GenerationEngine,
    Prompt,
    TeacherGuidedEngine,
    load_prompt_file,
)
from alignkit.rollout.episodes import EnvironmentRollout, SingleTurnRollout
from alignkit.rollout.rewards import RewardSource, build_reward_source
from alignkit.trainers.common import load_model_and_tokenizer
from alignkit.trainers.correction import BehaviourCorrection
from alignkit.trainers.critic import Critic, as_critic, build_critic
from alignkit.trainers.engine_config import vllm_engine
from alignkit.trainers.kl_penalty import KLPenalty
from alignkit.trainers.online import OnlineTrainer
from alignkit.trainers.pg_experience import PolicyGradientExperience, _batch
from alignkit.trainers.reward_metrics import RewardSourceStats
from alignkit.trainers.rl_config import PGConfig
from alignkit.trainers.token_masks import PolicyTokens

__all__ = ["PolicyGradientTrainer", "build_critic", "build_pg_trainer", "train_pg"]

#: The policy loss' statistics under their logged names (others: ``actor/<name>``).
_STAT_NAMES = {"clipfrac": "actor/pg_clipfrac", "approx_kl": "actor/ppo_kl"}


class PolicyGradientTrainer(PolicyGradientExperience, OnlineTrainer):
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
        rollout: SingleTurnRollout | EnvironmentRollout | None = None,
    ) -> None:
        """`critic`: the value model (wrapped in a :class:`Critic` with ``config.critic``'s
        settings), or a Critic; needed exactly when the estimator uses values. `rollout`: how
        an iteration's sequences are made (default: one completion per sample; an
        ``EnvironmentRollout`` runs multi-turn episodes, and `reward` may then be None when the
        environment scores them)."""
        super().__init__(
            config,
            model,
            tokenizer,
            prompts,
            reward,
            engine=engine,
            eval_prompts=eval_prompts,
            rollout=rollout,
        )
        self.config: PGConfig = config
        self.estimator = get_advantage_estimator(config.advantage.estimator)
        self.policy_loss = get_policy_loss(config.policy_loss.name)
        self.policy_loss_settings = self._policy_loss_settings()
        self.tokens = PolicyTokens(config.policy_loss)
        self.critic = as_critic(critic, config.critic, name="critic", prefix="critic")
        if "values" in self.estimator.needs and self.critic is None:
            raise ValueError(f"advantage estimator {self.estimator.name!r} needs a critic")
        self.kl = KLPenalty(config.kl)
        self.register_controller("kl", self.kl.controller)
        self.last_lr = config.optim.lr
        self.source_stats = RewardSourceStats()  # reward/<name>/mean and /std
        eos = getattr(tokenizer, "eos_token_id", None)
        self.correction = BehaviourCorrection(config.rollout.correction, self.sampling, eos)

    def _policy_loss_settings(self) -> dict[str, Any]:
        """The ``policy_loss`` config fields that the loss takes by name (clip ratios for
        ppo_clip), null ones at the loss' default: a new loss reads a field by naming it as a
        keyword parameter (``PolicyLossConfig.loss_settings``)."""
        return self.config.policy_loss.loss_settings()

    # ----------------------------------------------------------------- set-up

    def _prepare_training(self) -> None:
        super()._prepare_training()  # the engine got the initial policy
        self._engine_version = self.policy_version
        self.kl.prepare(self, self.config.reference, dtype=self.config.model.dtype)
        if self.critic is not None:
            self.critic.prepare(self)

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        super()._load_extra_state(state)
        self._engine_version = None  # resumed: the checkpoint's weights go out before a rollout

    def restore_model_weights(self, model: nn.Module, directory: Path) -> None:
        if isinstance(model, RewardModel):
            load_reward_checkpoint(model, directory)
        else:
            super().restore_model_weights(model, directory)

    # ----------------------------------------------------------------- experience

    def complete_experience(self, exp: Experience) -> Experience:
        device = self.accelerator.device
        with self.timed("reward"):
            exp.scores = self.rollout.score(exp, self.reward, self.text_scorer(exp)).to(device)
            components = getattr(self.reward, "last_components", {})  # a weighted sum's
            self.source_stats.add(self.state.step, components)
        with self.timed("old_logprobs"):
            if self.behaviour_is_old_policy:
                exp.old_logprobs = exp.behaviour_logprobs
            else:
                exp.old_logprobs = self.score_logprobs(self.model, exp)
            if self.corrects_behaviour:
                exp.is_weights = self.correction.weights(
                    exp, partial(self.score_logprobs, self.model, exp)
                )
        if self.kl.enabled:
            with self.timed("reference"):
                exp.reference_logprobs = self.kl.reference_logprobs(exp, self.score_logprobs)
        if self.critic is not None:
            with self.timed("values"):
                exp.values = self.critic.values(exp)
        with self.timed("advantage"):
            exp.scores = self.shape_scores(exp)
            exp.token_rewards = self.kl.shape_rewards(
                terminal_rewards(exp.scores, exp.response_mask), exp
            )
            exp.advantages, exp.returns = self.estimate(
                exp, exp.token_rewards, exp.values, exp.scores
            )
        return exp

    def merge_rounds(self, exp: Experience) -> Experience:
        """The batch that dynamic sampling kept from several rounds: its advantages again,
        so that batch statistics (scale_rewards=batch, rloo's normalize, whitening) are the
        kept batch's."""
        exp.advantages, exp.returns = self.estimate(exp, exp.token_rewards, exp.values, exp.scores)
        return exp

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
        with self.accelerator.autocast():
            floor = self.tokens.entropy_floor(micro, self._entropies, self.accelerator)
        loss_fn = partial(self.policy_objective, tokens=tokens, entropy_floor=floor)
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
        self,
        batch: Experience,
        units: Tensor,
        *,
        tokens: Tensor,
        entropy_floor: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's share of ``L = policy_loss - c_H * H + beta * KL`` (the step's
        sums over N `units`; H and the statistics over the step's `tokens`), and of its
        metrics. The policy term is taken on the tokens ``PolicyTokens.keep`` keeps."""
        cfg = self.config.policy_loss
        agg = cfg.resolved_agg
        mask = self.loss_mask(batch)
        logp, entropy = self._logprobs_and_entropy(batch)
        if self.exactly_on_policy:
            # pi_old is the policy of this very forward: its own log-probs, detached, make the
            # ratio exactly 1, where the engine's differ by numerics (bf16 on SmolLM2: mean
            # 0.04, up to 0.23 nats, beyond the clip range). TRL's GRPO does the same.
            batch = dataclasses.replace(batch, old_logprobs=logp.detach())
        keep, entropy_keep = self.tokens.keep(batch, logp, entropy, mask, entropy_floor)
        weights = batch.is_weights
        if keep is not None:
            weights = keep.float() if weights is None else weights * keep
        pg, stats = self.policy_loss(
            logp,
            batch.old_logprobs,
            batch.advantages,
            mask,
            weights=weights,
            agg=agg,
            normaliser=units,
            **self.policy_loss_settings,
        )
        mean_entropy = aggregate_loss(entropy, mask, "token-mean", normaliser=tokens)
        loss = pg
        if cfg.entropy_coef:  # at 0 the entropy is a metric: no backward through it
            # With top_entropy_quantile the bonus acts on the same tokens as the policy term.
            on = mask if entropy_keep is None else entropy_keep
            loss = loss - cfg.entropy_coef * aggregate_loss(entropy, on, normaliser=tokens)
        metrics = {"actor/pg_loss": pg, "actor/entropy": mean_entropy}
        kl = self.kl.loss_term(logp, batch, mask, agg, units)
        if kl is not None:
            loss = loss + self.kl.coef * kl
            metrics["actor/kl_loss"] = kl
        share = mask.sum() / tokens  # the statistics are token means of this micro-batch
        if keep is not None:
            metrics["actor/kept_token_frac"] = keep.sum() / tokens
        if entropy_floor is not None:
            metrics["actor/entropy_threshold"] = entropy_floor * share
        for name, value in stats.items():
            metrics[_STAT_NAMES.get(name, f"actor/{name}")] = value * share
        return loss, metrics

    def loss_mask(self, batch: Experience) -> Tensor:
        """``[N, T]`` the tokens the policy loss is taken on, counted by the step's normaliser
        and its token means: the response tokens, minus those of truncated completions with
        ``policy_loss.mask_truncated_completions`` (as TRL)."""
        return self.tokens.loss_mask(batch)

    def _logprobs_and_entropy(self, batch: Experience) -> tuple[Tensor, Tensor]:
        """The policy's ``[N, T]`` log-probs and entropies of the response tokens (one forward)."""
        return token_logprobs(
            self.model,
            _batch(batch),
            batch.response_mask,
            temperature=self.sampling.temperature,
            with_entropy=True,
            packed=self.config.model.packed,
        )

    def _entropies(self, batch: Experience) -> Tensor:
        return self._logprobs_and_entropy(batch)[1]

    def _units(self, batch: Experience) -> Tensor:
        """Loss units of a micro-batch: what the policy loss' ``agg`` averages over."""
        max_tokens = self.config.rollout.max_new_tokens
        agg = self.config.policy_loss.resolved_agg
        return aggregation_units(self.loss_mask(batch), agg, max_tokens=max_tokens)


# --------------------------------------------------------------------------------------
# Building from a config


def build_pg_trainer(
    cfg: PGConfig,
    trainer_class: type[PolicyGradientTrainer] = PolicyGradientTrainer,
    extra: Callable[[Any], dict[str, Any]] | None = None,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> PolicyGradientTrainer:
    """Load the policy, prompts, reward sources and critic; return the trainer.

    ``extra(tokenizer)`` gives a subclass' own constructor arguments (Safe-PPO's costs). A
    ``model`` (with its ``tokenizer``) given from Python is trained instead of loading
    ``cfg.model.name`` (``trainers.online_api``)."""
    from alignkit.errors import ConfigError

    if not cfg.data.train_file:
        raise ConfigError(
            "data.train_file is required (a prompt file, e.g. data/sort_prompts.jsonl)"
        )
    if not cfg.rewards and cfg.environment is None:
        raise ConfigError("rewards: give at least one source, e.g. [{function: sort_match}]")
    if cfg.environment is not None and trainer_class is not PolicyGradientTrainer:
        # Safe-PPO's cost sources score exp.completions, which an episode makes a transcript.
        raise ConfigError(f"environment: not supported by {trainer_class.__name__} yet")
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
    data = cfg.data
    rollout = build_environment_rollout(cfg, tokenizer)
    load = (
        partial(load_prompt_file, tokenizer=tokenizer) if rollout is None else rollout.load_prompts
    )
    prompts = load(data.train_file, max_length=data.max_prompt_length)
    eval_prompts = (
        load(data.eval_file, max_length=data.max_prompt_length, limit=data.max_eval_prompts)
        if data.eval_file
        else None
    )
    reward = (
        build_reward_source([s.spec() for s in cfg.rewards], tokenizer=tokenizer)
        if cfg.rewards
        else None
    )
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
    elif cfg.rollout.engine == "vllm":
        # Started at the trainer's first weight sync, in its run directory (known by then).
        engine = vllm_engine(cfg, tokenizer, prompts, lambda: trainer.run_dir.root / "vllm")
    critic = build_critic(cfg, cfg.critic) if cfg.critic is not None else None
    trainer = trainer_class(
        cfg,
        model,
        tokenizer,
        prompts,
        reward,
        engine=engine,
        eval_prompts=eval_prompts,
        critic=critic,
        rollout=rollout,
        **(extra(tokenizer) if extra is not None else {}),
    )
    return trainer


def build_environment_rollout(cfg: PGConfig, tokenizer: Any) -> EnvironmentRollout | None:
    """The episodes of ``cfg.environment`` (None without one)."""
    env = cfg.environment
    if env is None:
        return None
    from alignkit.rollout.environments import environment_factory

    return EnvironmentRollout(
        environment_factory(env.name, env.options),
        tokenizer,
        env.limits(),
        tool_format=env.tool_format,
        check_streams=env.check_token_stream,
    )


def train_pg(cfg: PGConfig) -> dict[str, Any]:
    """Run a policy-gradient method (ppo, grpo, rloo, reinforce++, reinforce)."""
    return build_pg_trainer(cfg).train()
