"""A critic: a value model V(s_t) with its own optimizer, used by PPO (and twice by Safe-PPO).

Per iteration ``values(exp)`` gives V(s_t) of every response token (the head at the position
before the token, ``ops.advantages.state_values``), which GAE turns into advantages and
lambda-returns R_t. Per mini-batch ``update`` makes one optimizer step of PPO's clipped value
loss towards R_t (``ops.losses.value_loss``)::

    L_V = c_V * 0.5 * token-mean over the step of max((V - R)^2, (V_clip - R)^2)

Its metrics carry the critic's prefix: ``<prefix>/vf_loss``, ``<prefix>/vf_clipfrac`` and
``<prefix>/grad_norm`` from ``update``, ``<prefix>/vf_explained_var`` and
``<prefix>/values_mean`` from ``metrics``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from alignkit.models.reward import load_reward_model
from alignkit.ops.advantages import state_values
from alignkit.ops.losses import value_loss
from alignkit.ops.stats import explained_variance, masked_mean
from alignkit.rollout import Experience
from alignkit.runloop.optimizer import OptimizerStep
from alignkit.trainers.online import disable_dropout
from alignkit.trainers.rl_config import CriticConfig, PGConfig

if TYPE_CHECKING:
    from alignkit.trainers.online import OnlineTrainer

__all__ = ["Critic", "as_critic", "build_critic"]


class Critic:
    """A value model and its optimizer (see the module docstring).

    Args:
        model: a value model: ``model(input_ids, attention_mask, return_token_values=True)``
            has ``token_values [N, T]`` (``models.reward.RewardModel``). Its dropout is
            switched off: its values are regression targets of the same states.
        config: the critic's settings (learning rate, value clip, loss weight).
        name: what its weights and optimizer are checkpointed under.
        prefix: the prefix of its metrics.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CriticConfig,
        *,
        name: str = "critic",
        prefix: str = "critic",
    ) -> None:
        disable_dropout(model)
        self.model = model
        self.config = config
        self.name, self.prefix = name, prefix
        self.step: OptimizerStep | None = None
        self.sequences_per_device: int | None = None  # set by prepare()

    def prepare(self, trainer: OnlineTrainer) -> None:
        """Register the model (checkpointed as `name`), prepare it with its own AdamW (the
        run's optimizer settings at the critic's learning rate) and schedule."""
        cfg = trainer.config
        self.sequences_per_device = cfg.train.sequences_per_device
        trainer.register_model(self.name, self.model)
        optim = dataclasses.replace(cfg.optim, lr=self.config.lr)
        self.model, self.step = trainer.build_optimizer_for(self.name, self.model, optim)

    def _values(self, batch: Experience) -> Tensor:
        out = self.model(batch.input_ids, batch.attention_mask, return_token_values=True)
        return state_values(out.token_values, batch.response_mask)

    @torch.no_grad()
    def values(self, exp: Experience) -> Tensor:
        """``[N, T]`` V(s_t) of each response token (0 elsewhere), a forward per micro-batch."""
        _, sequences_per_device = self._prepared()
        return torch.cat([self._values(chunk) for chunk in exp.split(sequences_per_device)])

    def _prepared(self) -> tuple[OptimizerStep, int]:
        if self.step is None or self.sequences_per_device is None:
            raise RuntimeError(f"{self.name}: call prepare(trainer) first")
        return self.step, self.sequences_per_device

    def update(
        self,
        micro_batches: Sequence[Experience],
        old_values: Sequence[Tensor],
        returns: Sequence[Tensor],
        *,
        step: int,
    ) -> dict[str, Tensor]:
        """One optimizer step towards `returns`, V clipped around `old_values` (the values of
        the rollout), one pair per micro-batch; the step's metrics (see the module docstring)."""
        cfg, prefix = self.config, self.prefix
        optimizer_step, _ = self._prepared()

        def loss_fn(item: tuple[Experience, Tensor, Tensor], units: Tensor):
            batch, old, target = item
            mask = batch.response_mask
            loss, stats = value_loss(
                self._values(batch), old, target, mask, clip=cfg.value_clip, agg="token-mean"
            )
            share = mask.sum() / units  # a token-mean of the micro-batch -> its share of the step
            metrics = {
                f"{prefix}/vf_loss": loss * share,
                f"{prefix}/vf_clipfrac": stats["vf_clipfrac"] * mask.sum() / units,
            }
            return cfg.coef * loss * share, metrics

        outcome = optimizer_step.run(
            list(zip(micro_batches, old_values, returns, strict=True)),
            loss_fn,
            lambda item: item[0].response_mask.sum(),
            step=step,
        )
        metrics = dict(outcome.metrics)
        if outcome.grad_norm is not None:
            metrics[f"{prefix}/grad_norm"] = outcome.grad_norm.detach().float()
        return metrics

    def metrics(self, values: Tensor, returns: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """How well the rollout's values predicted their returns, and their mean."""
        return {
            f"{self.prefix}/vf_explained_var": explained_variance(values, returns, mask),
            f"{self.prefix}/values_mean": masked_mean(values, mask),
        }


def as_critic(
    critic: nn.Module | Critic | None, config: CriticConfig | None, *, name: str, prefix: str
) -> Critic | None:
    """`critic` as a :class:`Critic`: a value model is wrapped with `config`'s settings,
    `name` and `prefix`; a Critic or None is returned as it is."""
    if critic is None or isinstance(critic, Critic):
        return critic
    if config is None:
        raise ValueError(f"a {name} model was given, but the config has no {name} settings")
    return Critic(critic, config, name=name, prefix=prefix)


def build_critic(cfg: PGConfig, critic: CriticConfig) -> nn.Module:
    """A value model as `critic` says: a value head on the policy's backbone, or a model's."""
    name = cfg.model.name if critic.model == "policy" else critic.model
    model, _ = load_reward_model(name, dtype=cfg.model.dtype, seed=cfg.seed)
    model.train()
    return model
