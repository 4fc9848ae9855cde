"""Safe-PPO: PPO-Lagrangian (Safe RLHF, Dai et al. 2023, arXiv:2310.12773), a subclass of the
policy-gradient trainer.

Per iteration, on top of PPO's reward side (``trainers/pg.py``)::

    costs          = cost sources(prompts, completions)        # > 0 unsafe (Safe RLHF's sign)
    cost values    = cost critic(exp)                          # same kind as the reward critic
    A_c, R_c       = estimator(cost on the last response token, cost values)   # GAE
    A              = (A_r - lambda * A_c) / (1 + lambda)       # ops.lagrangian_combine(A_r, -A_c)

the policy is updated on ``A``, the cost critic towards ``R_c`` (its own optimizer), and after the
update lambda moves once by ``ops.LagrangeMultiplier`` fed ``J_C = mean episode cost - cost_limit``
(the constraint is ``mean cost <= cost_limit``). The KL penalty (``kl.placement: reward``) stays
on the reward side only, so it is scaled by ``1 / (1 + lambda)`` with the reward advantage.

Logged: ``lambda`` (the value this iteration's advantages used), ``J_C`` (the EMA the update
reads), ``cost/mean``, ``cost/violation_rate`` (share of episodes with cost > 0, i.e. judged
unsafe), ``reward/mean`` and the cost critic's ``critic_cost/*``; with ``data.eval_file``, the
greedy held-out completions' ``eval/reward``, ``eval/accuracy``, ``eval/cost`` and
``eval/violation_rate`` (before training, as step 0, and at each evaluation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.ops.advantages import terminal_rewards
from alignkit.ops.lagrange import lagrangian_combine
from alignkit.ops.stats import violation_rate
from alignkit.rollout import Experience, Prompt
from alignkit.rollout.rewards import ModelReward, RewardSource, build_reward_source
from alignkit.trainers.critic import Critic, as_critic, build_critic
from alignkit.trainers.online import applicable
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer
from alignkit.trainers.safe_ppo_config import SafePPOConfig

__all__ = ["SafePPOConfig", "SafePPOTrainer", "train_safe_ppo"]


@dataclass
class SafeExperience(Experience):
    """An Experience with the cost side: ``[N]`` cost scores and ``[N, T]`` cost values,
    returns and advantages (carried through mini-batch selection like the reward side)."""

    cost_scores: Tensor | None = None
    cost_values: Tensor | None = None
    cost_returns: Tensor | None = None
    cost_advantages: Tensor | None = None


class SafePPOTrainer(PolicyGradientTrainer):
    """See the module docstring."""

    progress_metrics = ("reward/mean", "cost/mean", "lambda")

    def __init__(
        self,
        config: SafePPOConfig,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        reward: RewardSource,
        *,
        cost: RewardSource,
        cost_critic: nn.Module | Critic | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, model, tokenizer, prompts, reward, **kwargs)
        self.config: SafePPOConfig = config
        if (cost_critic is None) != (self.critic is None):
            raise ValueError("Safe-PPO needs a cost critic exactly when it has a reward critic")
        self.cost = cost
        self.cost_critic = as_critic(
            cost_critic, config.cost_critic, name="cost_critic", prefix="critic_cost"
        )
        self.multiplier = config.lambda_.build()
        self.register_controller("lambda", self.multiplier)

    def _prepare_training(self) -> None:
        super()._prepare_training()
        if self.cost_critic is not None:
            self.cost_critic.prepare(self)

    def complete_experience(self, exp: Experience) -> Experience:
        """PPO's experience (reward advantages), then the cost side, then the combination
        ``A = (A_r - lambda A_c) / (1 + lambda)``."""
        base = super().complete_experience(exp)
        exp = SafeExperience(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        with self.timed("cost"):
            exp.cost_scores = self.score(self.cost, exp).to(exp.scores.device)
        if self.cost_critic is not None:
            with self.timed("cost_values"):
                exp.cost_values = self.cost_critic.values(exp)
        with self.timed("advantage"):
            token_costs = terminal_rewards(exp.cost_scores, exp.response_mask)
            exp.cost_advantages, exp.cost_returns = self.estimate(
                exp, token_costs, exp.cost_values, exp.cost_scores
            )
            assert exp.advantages is not None
            exp.advantages = lagrangian_combine(
                exp.advantages, -exp.cost_advantages, self.multiplier.value
            )
        return exp

    def experience_metrics(self, exp: Experience) -> dict[str, Tensor]:
        assert isinstance(exp, SafeExperience) and exp.cost_scores is not None
        metrics = super().experience_metrics(exp)
        costs = exp.cost_scores
        scored = torch.isfinite(costs)
        zero = costs.new_zeros(())
        metrics["cost/mean"] = costs[scored].mean() if scored.any() else zero
        metrics["cost/violation_rate"] = violation_rate(costs)
        if self.cost_critic is not None:
            metrics.update(
                self.cost_critic.metrics(exp.cost_values, exp.cost_returns, exp.response_mask)
            )
        return metrics

    def optimize(self, minibatch: Experience) -> dict[str, Tensor]:
        """PPO's policy and reward-critic steps, then one step of the cost critic towards the
        cost returns."""
        metrics = super().optimize(minibatch)
        if self.cost_critic is not None:
            micro = minibatch.split(self.config.train.sequences_per_device)
            values, returns = [m.cost_values for m in micro], [m.cost_returns for m in micro]
            metrics.update(
                self.cost_critic.update(micro, values, returns, step=self.state.step + 1)
            )
        return metrics

    def evaluate(self) -> dict[str, float]:
        """PPO's greedy held-out evaluation (one generation) with the cost judged too:
        ``eval/cost`` (mean) and ``eval/violation_rate`` (share with cost > 0)."""
        rewards, costs = map(applicable, self.score_eval_generations(self.reward, self.cost))
        return {
            "eval/reward": float(rewards.mean()),
            "eval/accuracy": float((rewards >= 1).float().mean()),
            "eval/cost": float(costs.mean()),
            "eval/violation_rate": float((costs > 0).float().mean()),
        }

    def after_iteration(self, metrics: Mapping[str, Tensor]) -> dict[str, float]:
        values = super().after_iteration(metrics)
        used = self.multiplier.value
        self.multiplier.update(float(metrics["cost/mean"]) - self.config.cost_limit)
        values["lambda"] = used
        values["J_C"] = float(self.multiplier.j_c_ema)
        return values


def build_safe_ppo_trainer(cfg: SafePPOConfig, **loaded: Any) -> SafePPOTrainer:
    """Load everything PPO does, plus the cost sources and the cost critic (``loaded``: a
    model and tokenizer given from Python, as for ``build_pg_trainer``)."""
    if not cfg.costs:
        raise ConfigError(
            "costs: give at least one source, e.g. [{function: assistant_safety_cost}]"
        )

    def extra(tokenizer: Any) -> dict[str, Any]:
        cost = build_reward_source([s.spec() for s in cfg.costs], tokenizer=tokenizer)
        for source, _ in cost.sources:
            if isinstance(source, ModelReward) and source.kind != "cost":
                # A reward model's score has the opposite sign: higher = better, not unsafer.
                raise ConfigError(
                    f"costs: {source.name} is a {source.kind} model, not a cost model "
                    "(`alignkit train cost`); a reward model belongs in rewards"
                )
        critic = build_critic(cfg, cfg.cost_critic) if cfg.cost_critic is not None else None
        return {"cost": cost, "cost_critic": critic}

    trainer = build_pg_trainer(cfg, SafePPOTrainer, extra, **loaded)
    assert isinstance(trainer, SafePPOTrainer)
    return trainer


def train_safe_ppo(cfg: SafePPOConfig) -> dict[str, Any]:
    """Run Safe-PPO (PPO-Lagrangian); returns the run summary."""
    return build_safe_ppo_trainer(cfg).train()
