"""The config of on-policy distillation (``alignkit train distill``); torch-free, so that the CLI
reads and checks it without importing the trainers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignkit.config.schema import field_help
from alignkit.errors import ConfigError
from alignkit.trainers.rl_config import OnlineConfig

__all__ = ["DistillConfig", "DistillSettings"]


@dataclass
class DistillSettings:
    """The teacher and how the per-token KL is averaged."""

    teacher: str = field(
        default="",
        metadata=field_help(
            "The teacher: a causal LM name or path with the policy's tokenizer (required)."
        ),
    )
    agg: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = field(
        default="token-mean",
        metadata=field_help(
            "How the per-token KL is averaged over the optimizer step (as policy_loss.agg); "
            "token-mean is TRL DistillationTrainer's."
        ),
    )


@dataclass
class DistillConfig(OnlineConfig):
    """On-policy distillation: samples of the policy, the reverse KL to a teacher on them."""

    distill: DistillSettings = field(
        default_factory=DistillSettings, metadata=field_help("Teacher and loss.")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollout.teacher:
            raise ConfigError(
                "rollout.teacher samples from a policy/teacher mixture; distillation trains on "
                "the policy's own samples: give the teacher as distill.teacher"
            )
        if self.reference:
            raise ConfigError("reference has no effect in distillation (no KL to a reference)")
        if self.rollout.max_staleness is not None:
            raise ConfigError(
                "rollout.max_staleness: the distillation loss is on-policy (the reverse KL on the "
                "policy's own samples) and has no importance correction; set it to null"
            )
        if self.rollout.filter_groups:
            raise ConfigError(
                "rollout.filter_groups filters groups by reward for group advantages; the "
                "distillation loss has no advantages"
            )
