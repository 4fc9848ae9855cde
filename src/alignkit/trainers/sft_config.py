"""The config of `alignkit train sft` (``SFTConfig``), torch-free so that the CLI reads and
checks it without importing the trainer (``trainers/sft.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignkit.config import TrainConfig
from alignkit.config.inputs import DataConfig, ModelConfig
from alignkit.config.schema import EVALUATION, requires

__all__ = ["SFTConfig", "SFTDataConfig"]


@dataclass
class SFTDataConfig(DataConfig):
    """SFT data: the shared data settings plus which assistant turns are trained on."""

    assistant_turns: Literal["all", "last"] = field(
        default="all",
        metadata={
            "help": 'In {"messages"} rows with several assistant turns: all trains every '
            "assistant turn (each as the chat template renders it), last only the final one. "
            "Every other token is masked either way."
        },
    )


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on ``{"prompt","completion"}`` or ``{"messages"}`` rows."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Policy."})
    data: SFTDataConfig = field(default_factory=SFTDataConfig, metadata={"help": "SFT data."})
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several examples into each row of data.max_length tokens (a "
            "block-diagonal attention mask keeps them apart): less padding, faster epochs."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        requires(self, EVALUATION, bool(self.data.eval_file), "data.eval_file")
        # SFT's padding-free forward is the one over packed rows.
        requires(self, "model.packed", self.packing, "packing=true")
