"""Training methods by CLI name: their config class, entry point and default overrides."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """One `alignkit train <name>` method; imported only when used."""

    module: str
    config_class: str
    entry_point: str
    defaults: tuple[str, ...] = ()
    summary: str = ""
    #: Where `config_class` is defined, when that module is lighter than the trainer's: the CLI
    #: then answers --help and config errors without importing torch.
    config_module: str | None = None

    def load_config_class(self) -> type:
        return getattr(
            importlib.import_module(self.config_module or self.module), self.config_class
        )

    def load(self) -> tuple[type, Callable[[Any], dict[str, Any]]]:
        config_class = self.load_config_class()
        return config_class, getattr(importlib.import_module(self.module), self.entry_point)


METHODS: dict[str, Method] = {
    "sft": Method(
        "alignkit.trainers.sft",
        "SFTConfig",
        "train_sft",
        summary="supervised fine-tuning, prompt-masked cross-entropy",
        config_module="alignkit.trainers.sft_config",
    ),
    "rm": Method(
        "alignkit.trainers.reward",
        "RewardConfig",
        "train_reward",
        ("kind=reward",),
        summary="reward model on preference pairs (Bradley-Terry, margin, hinge)",
        config_module="alignkit.trainers.reward_config",
    ),
    "cost": Method(
        "alignkit.trainers.reward",
        "RewardConfig",
        "train_reward",
        ("kind=cost",),
        summary="cost model on safety preferences (cost > 0 = unsafe)",
        config_module="alignkit.trainers.reward_config",
    ),
    "dpo": Method(
        "alignkit.trainers.dpo",
        "DPOConfig",
        "train_dpo",
        summary="DPO family: sigmoid, ipo, hinge, robust, and the reference-free simpo, orpo",
        config_module="alignkit.trainers.dpo_config",
    ),
    "safe-dpo": Method(
        "alignkit.trainers.safe_dpo",
        "SafeDPOConfig",
        "train_safe_dpo",
        summary="DPO with a safety constraint and a log-space Lagrange multiplier",
        config_module="alignkit.trainers.dpo_config",
    ),
    "rm-ensemble": Method(
        "alignkit.trainers.ensemble",
        "EnsembleConfig",
        "train_rm_ensemble",
        summary="K reward (or cost) models on resampled data, best checkpoint each, one run",
        config_module="alignkit.trainers.reward_config",
    ),
    "ppo": Method(
        "alignkit.trainers.pg",
        "PGConfig",
        "train_pg",
        ("advantage.estimator=gae",),
        summary="PPO: clipped policy loss, a critic (value head), GAE",
        config_module="alignkit.trainers.rl_config",
    ),
    "grpo": Method(
        "alignkit.trainers.pg",
        "PGConfig",
        "train_pg",
        ("advantage.estimator=grpo",),
        summary="GRPO: group-normalised outcome advantages, no critic",
        config_module="alignkit.trainers.rl_config",
    ),
    "rloo": Method(
        "alignkit.trainers.pg",
        "PGConfig",
        "train_pg",
        ("advantage.estimator=rloo",),
        summary="RLOO: leave-one-out baseline within each prompt's group",
        config_module="alignkit.trainers.rl_config",
    ),
    "reinforce++": Method(
        "alignkit.trainers.pg",
        "PGConfig",
        "train_pg",
        ("advantage.estimator=reinforce_pp",),
        summary="REINFORCE++: returns whitened over the batch, KL in the reward",
        config_module="alignkit.trainers.rl_config",
    ),
    "reinforce": Method(
        "alignkit.trainers.pg",
        "PGConfig",
        "train_pg",
        ("advantage.estimator=reinforce", "policy_loss.name=policy_gradient"),
        summary="REINFORCE (seed 003): plain policy gradient, batch-mean baseline",
        config_module="alignkit.trainers.rl_config",
    ),
    "distill": Method(
        "alignkit.trainers.distill",
        "DistillConfig",
        "train_distill",
        summary="on-policy distillation: per-token reverse KL to a teacher on own samples (GKD)",
        config_module="alignkit.trainers.distill_config",
    ),
    "safe-ppo": Method(
        "alignkit.trainers.safe_ppo",
        "SafePPOConfig",
        "train_safe_ppo",
        ("advantage.estimator=gae",),
        summary="Safe-PPO (PPO-Lagrangian): reward and cost critics, lambda on mean cost",
        config_module="alignkit.trainers.safe_ppo_config",
    ),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown training method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]
