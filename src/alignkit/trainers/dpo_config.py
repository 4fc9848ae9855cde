"""The configs of `alignkit train dpo` (``DPOConfig``) and `train safe-dpo` (``SafeDPOConfig``,
whose ``LambdaConfig`` extends the ``MultiplierConfig`` of ``trainers/lagrange_config.py``
that Safe-PPO shares), torch-free so that
the CLI reads and checks them without importing the trainers (``trainers/dpo.py``,
``trainers/safe_dpo.py``); the checks that ask the registered losses import them when a config
is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignkit.config import TrainConfig
from alignkit.config.inputs import DataConfig, ModelConfig
from alignkit.config.schema import requires
from alignkit.errors import ConfigError
from alignkit.trainers.lagrange_config import MultiplierConfig

__all__ = [
    "DPOConfig",
    "DPOLossConfig",
    "LambdaConfig",
    "MultiplierConfig",
    "SafeDPOConfig",
    "SafetyConfig",
]


@dataclass
class DPOLossConfig:
    """Which loss of the DPO family, and its temperature."""

    kind: str = field(
        default="sigmoid",
        metadata={
            "help": "sigmoid (DPO), ipo, hinge (SLiC), robust (Chowdhury et al.); the "
            "reference-free simpo (Meng et al.) and orpo (Hong et al.; beta is its lambda), "
            "which run no reference pass; or any loss registered with "
            "alignkit.ops.preference.register_dpo_loss."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the log-ratios."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label noise epsilon for sigmoid (cDPO) and robust."}
    )
    simpo_gamma: float | None = field(
        default=None,
        metadata={
            "help": "SimPO's target reward margin gamma (null: 0.5, TRL's default); only a "
            "kind with a margin accepts it."
        },
    )
    length_normalize: bool = field(
        default=False,
        metadata={
            "help": "Divide the policy's and the reference's summed log-probs of each response "
            "by its token count before the loss. Off by default: summed log-ratios keep beta's "
            "meaning the same across kinds. On reproduces TRL's IPO, which divides each "
            "sequence's log-ratio by its completion length. The reference-free simpo and "
            "orpo always use per-token mean log-probs, whatever this says."
        },
    )
    nll_weight: float = field(
        default=0.0,
        metadata={
            "help": "RPO alpha: adds alpha * per-token NLL of the winning response to each "
            "pair's loss (0: plain DPO), so DPO cannot widen margins by lowering both."
        },
    )


@dataclass
class DPOConfig(TrainConfig):
    """DPO on ``{"prompt","chosen","rejected"}`` rows."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Policy."})
    reference: str | None = field(
        default=None,
        metadata={
            "help": "Reference model name/path; null: the initial policy (or, with LoRA, "
            "the policy with its adapter disabled)."
        },
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Preference data."})
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig, metadata={"help": "Loss."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # Imported here: the CLI reads and checks configs without importing torch.
        from alignkit.ops.preference import DPO_LOSSES, is_reference_free

        DPO_LOSSES.check(self.dpo.kind, "dpo.kind")
        evaluates = bool(self.data.eval_file)
        requires(self, "eval.every", evaluates, "data.eval_file")
        # The reference pass reads its batches with eval.examples_per_device too.
        batches = evaluates or not is_reference_free(self.dpo.kind)
        requires(
            self,
            "eval.examples_per_device",
            batches,
            "data.eval_file",
            because=f"with data.eval_file=null and dpo.kind={self.dpo.kind} (no reference pass)",
        )
        if self.dpo.beta <= 0:
            raise ConfigError("dpo.beta must be > 0")
        if self.dpo.nll_weight < 0:
            raise ConfigError("dpo.nll_weight must be >= 0")
        if is_reference_free(self.dpo.kind):
            self._check_reference_free()
            return
        if self.dpo.simpo_gamma is not None:
            raise ConfigError(f"dpo.simpo_gamma is not defined for dpo.kind={self.dpo.kind}")
        # The loss itself knows which label_smoothing it accepts; asked now, a bad value is a
        # config error instead of a traceback after the reference pass.
        import torch

        try:
            DPO_LOSSES[self.dpo.kind](torch.zeros(1), self.dpo.beta, self.dpo.label_smoothing)
        except ValueError as err:
            raise ConfigError(f"dpo.label_smoothing: {err}") from None

    def _check_reference_free(self) -> None:
        import torch

        from alignkit.ops.preference import DPO_LOSSES

        kind = self.dpo.kind
        if self.reference:
            raise ConfigError(f"reference is set but dpo.kind={kind} uses no reference model")
        if self.dpo.label_smoothing != 0.0:
            raise ConfigError(f"dpo.label_smoothing is not defined for dpo.kind={kind}")
        # The loss knows which margin it accepts (a per-token mean log-prob is < 0).
        try:
            logps = torch.full((1,), -1.0)
            DPO_LOSSES[kind](logps, logps, self.dpo.beta, self.dpo.simpo_gamma)
        except ValueError as err:
            raise ConfigError(f"dpo.simpo_gamma: {err}") from None


@dataclass
class LambdaConfig(MultiplierConfig):
    """Safe-DPO's multiplier: the update, and how J_C is estimated from the pairs."""

    cost_estimator: Literal["policy", "data"] = field(
        default="policy",
        metadata={
            "help": "policy: J_C from the policy's preference (seed 000); data: -mean(delta_S)."
        },
    )
    preference: Literal["log_ratio", "implicit_reward"] = field(
        default="log_ratio",
        metadata={
            "help": "What sign() reads in J_C: the policy's log-prob difference (seed 000) or "
            "the implicit-reward difference (log-ratios to the reference)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        policy = self.cost_estimator == "policy"
        requires(self, "preference", policy, "cost_estimator=policy", scope="lambda")


@dataclass
class SafetyConfig:
    """Where the safety scores of the two responses come from."""

    source: Literal["data", "cost_model"] = field(
        default="data",
        metadata={"help": "data: chosen_safety/rejected_safety fields; cost_model: -cost."},
    )
    cost_model: str | None = field(
        default=None, metadata={"help": "Trained cost model directory (source: cost_model)."}
    )

    def __post_init__(self) -> None:
        used = self.source == "cost_model"
        requires(self, "cost_model", used, "source=cost_model", scope="safety")


@dataclass
class SafeDPOConfig(DPOConfig):
    """Safe-DPO on safety-preference rows (PKU-SafeRLHF or flattened format)."""

    safety: SafetyConfig = field(default_factory=SafetyConfig, metadata={"help": "Safety."})
    lambda_: LambdaConfig = field(
        default_factory=LambdaConfig, metadata={"help": "Lagrange multiplier (YAML: lambda)."}
    )
    normalize: bool = field(
        default=True, metadata={"help": "Divide the total by (1 + lambda), as Safe RLHF does."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from alignkit.ops.preference import is_reference_free

        if is_reference_free(self.dpo.kind):
            raise ConfigError(
                f"dpo.kind={self.dpo.kind} is reference-free; Safe-DPO needs a reference kind"
            )
        if self.dpo.length_normalize:
            raise ConfigError("dpo.length_normalize is not supported by Safe-DPO; set it to false")
        if self.safety.source == "cost_model" and not self.safety.cost_model:
            raise ConfigError("safety.source=cost_model needs safety.cost_model (a directory)")
        if self.safety.source == "cost_model":
            from alignkit.models.reward import check_saved_kind

            check_saved_kind(self.safety.cost_model, "cost", "safety.cost_model")
