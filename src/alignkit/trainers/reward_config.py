"""The configs of `alignkit train rm` / `train cost` (``RewardConfig``) and `train rm-ensemble`
(``EnsembleConfig``), torch-free so that the CLI reads and checks them without importing the
trainers (``trainers/reward.py``, ``trainers/ensemble.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignkit.config import TrainConfig
from alignkit.config.inputs import DataConfig, ModelConfig
from alignkit.config.schema import EVALUATION, field_help, requires
from alignkit.errors import ConfigError

__all__ = [
    "EnsembleConfig",
    "EnsembleSettings",
    "RewardConfig",
    "RewardHeadConfig",
    "TaskWeightsConfig",
]


@dataclass
class TaskWeightsConfig:
    """Weights of the multi-task loss (seed 002 §4.3.4): w_pref*pref + w_help*help + w_safe*safe."""

    preference: float = field(default=1.0, metadata=field_help("Weight of the pairwise loss."))
    helpfulness: float = field(
        default=1.0,
        metadata=field_help("Weight of the helpfulness head's MSE (if that head is on)."),
    )
    safety: float = field(
        default=1.0, metadata=field_help("Weight of the safety head's BCE (if that head is on).")
    )

    def __post_init__(self) -> None:
        for name in ("preference", "helpfulness", "safety"):
            if getattr(self, name) < 0:
                raise ConfigError(f"task_weights.{name} must be >= 0")


@dataclass
class RewardHeadConfig:
    """What sits on the backbone (see ``alignkit.models.reward``)."""

    head: Literal["linear", "mlp"] = field(
        default="linear",
        metadata=field_help("linear: Linear(H, 1); mlp: Linear, ReLU, Dropout, Linear."),
    )
    pooling: Literal["last", "mean", "max", "cls", "attention"] = field(
        default="last",
        metadata=field_help(
            "Hidden states -> one vector: last real token, mean, max, cls, attention."
        ),
    )
    aux_heads: list[Literal["helpfulness", "safety"]] = field(
        default_factory=list,
        metadata=field_help(
            "Auxiliary heads (kind=reward only). helpfulness regresses the rows' "
            "chosen_helpfulness/rejected_helpfulness; safety classifies chosen_is_safe/"
            "rejected_is_safe (safety-preference data)."
        ),
    )
    mlp_dropout: float = field(default=0.1, metadata=field_help("Dropout inside the mlp head."))
    task_weights: TaskWeightsConfig = field(
        default_factory=TaskWeightsConfig, metadata=field_help("Multi-task loss weights.")
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlp_dropout < 1.0:
            raise ConfigError("mlp_dropout must lie in [0, 1)")
        if len(set(self.aux_heads)) != len(self.aux_heads):
            raise ConfigError(f"aux_heads lists a head twice: {self.aux_heads}")
        requires(self, "mlp_dropout", self.head == "mlp", "head=mlp", scope="reward_model")
        for head in ("helpfulness", "safety"):
            key, enable = f"task_weights.{head}", f"aux_heads=[{head}]"
            requires(self, key, head in self.aux_heads, enable, scope="reward_model")


@dataclass
class RewardConfig(TrainConfig):
    """A reward model (kind=reward, ``alignkit train rm``) or cost model (kind=cost,
    ``alignkit train cost``) trained on pairs."""

    kind: Literal["reward", "cost"] = field(
        default="reward",
        metadata=field_help(
            "reward: pairwise preference loss; cost: Safe RLHF cost loss (cost > 0 = unsafe)."
        ),
    )
    model: ModelConfig = field(
        default_factory=ModelConfig, metadata=field_help("Backbone (or a saved reward model).")
    )
    reward_model: RewardHeadConfig = field(
        default_factory=RewardHeadConfig, metadata=field_help("Head, pooling and auxiliary heads.")
    )
    loss: str = field(
        default="bt",
        metadata=field_help(
            "kind=reward: bt -log s(d - m), margin_weighted -log s(d * m), hinge relu(m - d), "
            "d = r_chosen - r_rejected, or any loss registered with "
            "alignkit.ops.preference.register_reward_loss. kind=cost uses its own loss "
            "(must stay bt)."
        ),
    )
    use_margin: bool = field(
        default=True,
        metadata=field_help(
            "Use the rows' margin field as m when the data has one (else bt/margin_weighted "
            "use none and hinge uses 1)."
        ),
    )
    data_format: Literal["preference", "safety_preference"] | None = field(
        default=None,
        metadata=field_help(
            "Format of the data files; null: preference for kind=reward, safety_preference "
            "for kind=cost."
        ),
    )
    data: DataConfig = field(default_factory=DataConfig, metadata=field_help("Pair data."))

    def __post_init__(self) -> None:
        super().__post_init__()
        # Imported here: the CLI reads and checks configs without importing torch.
        from alignkit.ops.preference import REWARD_LOSSES

        REWARD_LOSSES.check(self.loss, "loss")
        requires(self, EVALUATION, bool(self.data.eval_file), "data.eval_file")
        # A cost model's loss (Safe RLHF eq. 6) has no margin and no task weights.
        margin = ("use_margin", "reward_model.task_weights.preference")
        requires(self, margin, self.kind == "reward", "kind=reward")
        if self.model.lora is not None:
            raise ConfigError(
                "model.lora: reward and cost models train all weights; LoRA is not supported "
                "for them, set model.lora to null"
            )
        if self.kind == "cost":
            if self.data_format == "preference":
                raise ConfigError(
                    "kind=cost trains on safety preferences: data_format must be "
                    "safety_preference (or null)"
                )
            if self.loss != "bt":
                raise ConfigError(
                    f"loss={self.loss!r}: kind=cost uses the Safe RLHF cost loss (a "
                    "Bradley-Terry term plus a sign term); leave loss at bt"
                )
            if self.reward_model.aux_heads:
                raise ConfigError(
                    "reward_model.aux_heads are for kind=reward; a cost model's sign term "
                    "already classifies responses as safe or unsafe"
                )

    @property
    def resolved_data_format(self) -> str:
        if self.data_format is not None:
            return self.data_format
        return "safety_preference" if self.kind == "cost" else "preference"


@dataclass
class EnsembleSettings:
    """How many members and how their data differ."""

    members: int = field(default=3, metadata=field_help("Number of members K (>= 2)."))
    resample: Literal["bootstrap", "shards", "seeds"] = field(
        default="bootstrap",
        metadata=field_help(
            "bootstrap: rows drawn with replacement per member; shards: disjoint parts; "
            "seeds: all rows, member k trains with seed + k."
        ),
    )
    stacking_file: str | None = field(
        default=None,
        metadata=field_help("Held-out pairs to fit the stacking weights on (null: no stacking)."),
    )
    keep_data: bool = field(
        default=False,
        metadata=field_help("Keep each member's resampled training file in <run>/data."),
    )

    def __post_init__(self) -> None:
        if self.members < 2:
            raise ConfigError(f"ensemble.members must be >= 2, got {self.members}")


@dataclass
class EnsembleConfig(RewardConfig):
    """A reward- or cost-model ensemble; every RewardConfig key applies to each member."""

    ensemble: EnsembleSettings = field(
        default_factory=EnsembleSettings, metadata=field_help("Members and their data.")
    )

    def __post_init__(self) -> None:
        # Each member stops early on a watched metric: held-out accuracy unless one is named
        # (implied here so that patience and min_delta count as used).
        rule = self.eval.early_stopping
        if rule.metric is None:
            rule.metric = "eval/accuracy"
        super().__post_init__()
        # A member's checkpoints are its evaluations, all kept until the best is known.
        members_save = "each member saves a checkpoint at every evaluation (eval.every)"
        checkpoints = ("checkpoint.every", "checkpoint.keep_last")
        requires(self, checkpoints, False, because="in rm-ensemble", advice=members_save)
        if self.resume_from:
            raise ConfigError("rm-ensemble does not resume; start it again (overwrite=true)")
        if self.ensemble.stacking_file and self.kind != "reward":
            raise ConfigError("ensemble.stacking_file: stacking is fitted for kind=reward only")
        if not self.data.eval_file:
            raise ConfigError(
                "rm-ensemble keeps each member's best checkpoint by validation accuracy: "
                "set data.eval_file"
            )
