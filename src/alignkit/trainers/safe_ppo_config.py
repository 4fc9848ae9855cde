"""The config of `alignkit train safe-ppo` (``SafePPOConfig``), torch-free so that the CLI
reads and checks it without importing the trainer (``trainers/safe_ppo.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.errors import ConfigError
from alignkit.trainers.lagrange_config import MultiplierConfig
from alignkit.trainers.rl_config import CriticConfig, PGConfig, RewardSourceConfig

__all__ = ["SafePPOConfig"]


@dataclass
class SafePPOConfig(PGConfig):
    """PPO with a cost constraint ``mean episode cost <= cost_limit`` and a multiplier."""

    costs: list[RewardSourceConfig] = field(
        default_factory=list,
        metadata={
            "help": "Cost sources (> 0 unsafe), summed with their weights, same syntax as "
            "rewards: [{function: assistant_safety_cost}] or [{model: runs/cost}]."
        },
    )
    cost_limit: float = field(
        default=0.0,
        metadata={
            "help": "The constraint: mean episode cost <= cost_limit. (The logged "
            "cost/violation_rate is the share of episodes with cost > 0, i.e. unsafe.)"
        },
    )
    lambda_: MultiplierConfig = field(
        default_factory=MultiplierConfig,
        metadata={"help": "Lagrange multiplier, fed J_C = mean cost - cost_limit (YAML: lambda)."},
    )
    cost_critic: CriticConfig | None = field(
        default=None,
        metadata={
            "help": "The cost critic (same kind as `critic`); null: the default critic when "
            "the estimator needs values."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.critic is not None and self.cost_critic is None:
            self.cost_critic = CriticConfig()
        if self.critic is None and self.cost_critic is not None:
            raise ConfigError(
                f"cost_critic is set but advantage.estimator={self.advantage.estimator} does "
                "not use values; use estimator=gae or cost_critic=null"
            )
