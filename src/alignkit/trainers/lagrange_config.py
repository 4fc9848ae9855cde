"""The settings of a Lagrange multiplier's update (``ops.lagrange.LagrangeMultiplier``), shared
by Safe-DPO (``dpo_config.LambdaConfig`` extends it with how J_C is estimated from pairs) and
Safe-PPO (``safe_ppo_config.SafePPOConfig.lambda_``). Torch-free, like every config module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from alignkit.config.schema import requires

if TYPE_CHECKING:
    from alignkit.ops.lagrange import LagrangeMultiplier

__all__ = ["MultiplierConfig"]


@dataclass
class MultiplierConfig:
    """A Lagrange multiplier's update (seed 000; `ops.LagrangeMultiplier`)."""

    init: float = field(default=1.0, metadata={"help": "Initial lambda."})
    lr: float = field(default=0.01, metadata={"help": "Step size alpha of the update."})
    ema: float = field(default=0.95, metadata={"help": "EMA factor of J_C (log rule)."})
    min_value: float = field(default=1e-6, metadata={"help": "Floor of lambda."})
    max_value: float = field(default=10.0, metadata={"help": "Ceiling of lambda."})
    rule: Literal["log", "linear"] = field(
        default="log",
        metadata={"help": "log: ln l += lr*l*J_C_ema (seed 000); linear: l += lr*J_C (old)."},
    )

    def __post_init__(self) -> None:
        # The linear rule steps on the batch's J_C; the EMA only feeds the log rule.
        requires(self, "ema", self.rule == "log", "rule=log", scope="lambda")

    def build(self) -> LagrangeMultiplier:
        from alignkit.ops.lagrange import LagrangeMultiplier

        return LagrangeMultiplier(
            init=self.init,
            lr=self.lr,
            ema=self.ema,
            min_value=self.min_value,
            max_value=self.max_value,
            rule=self.rule,
        )
