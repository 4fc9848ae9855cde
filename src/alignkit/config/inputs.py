"""What a run trains on: the model (and its LoRA adapter) and the data files. Shared by every
trainer's config; torch-free, so that the CLI checks a config without importing the trainers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignkit.config.schema import field_help, requires
from alignkit.errors import ConfigError


@dataclass
class LoraConfig:
    """LoRA adapter settings (peft). The reference model is the policy with the adapter off."""

    r: int = field(default=8, metadata=field_help("Rank of the low-rank update."))
    alpha: float = field(default=16.0, metadata=field_help("Scale numerator: update * alpha / r."))
    dropout: float = field(default=0.0, metadata=field_help("Dropout on the adapter's input."))
    target_modules: list[str] | str = field(
        default="all-linear", metadata=field_help("Module names to adapt, or 'all-linear'.")
    )


@dataclass
class ModelConfig:
    """Which model to train and how to load it."""

    name: str = field(
        default="tiny",
        metadata=field_help(
            "'tiny' (built-in preset), a fetched name (e.g. smollm2-135m-instruct), a local "
            "Hugging Face directory, or a hub id already in the local cache."
        ),
    )
    dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata=field_help("Dtype of the weights.")
    )
    lora: LoraConfig | None = field(default=None, metadata=field_help("LoRA adapter; null: full."))
    packed: bool = field(
        default=True,
        metadata=field_help(
            "Padding-free forward passes in the DPO family (policy and reference pass), "
            "reward/cost model training, SFT's packed rows and the online trainers' scoring "
            "and policy passes (a group's prompt computed once): a batch's real tokens in one "
            "row where each sequence attends only to itself (sdpa; eager: a few rows with a "
            "block-diagonal causal mask), a pair's prompt computed once. Same log-probs and "
            "rewards as the padded forward to float round-off; used where the model allows it "
            "(a transformers decoder with sdpa or eager attention)."
        ),
    )


@dataclass
class DataConfig:
    """Where the data is and how long a row may be."""

    train_file: str | list[str] = field(
        default="",
        metadata=field_help(
            "Training data file or directory, or a list of them mixed by train_weights."
        ),
    )
    train_weights: list[float] | None = field(
        default=None,
        metadata=field_help(
            "With several train files: how much of each to use (2: every row twice, 0.5: a "
            "seeded half); null: all of each once."
        ),
    )
    eval_file: str | None = field(
        default=None, metadata=field_help("Held-out data for evaluation.")
    )
    max_length: int = field(default=512, metadata=field_help("Tokens per row (prompt + answer)."))
    length_policy: Literal["truncate", "drop", "error"] = field(
        default="truncate",
        metadata=field_help(
            "Rows over max_length: truncate (keep the prompt's end), drop, or error."
        ),
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata=field_help(
            "Keep only each prompt's last N tokens (TRL's max_prompt_length), before "
            "max_length applies; null: no limit."
        ),
    )
    train_split: str | None = field(
        default=None,
        metadata=field_help("Split of a saved DatasetDict directory to train on (e.g. train)."),
    )
    eval_split: str | None = field(
        default=None,
        metadata=field_help("Split of a saved DatasetDict directory to evaluate on (e.g. test)."),
    )
    max_problems: int = field(default=20, metadata=field_help("Bad rows listed before stopping."))
    max_train_examples: int | None = field(
        default=None,
        metadata=field_help(
            "Train on a random subset of this many rows (drawn by seed); null: all."
        ),
    )
    max_eval_examples: int | None = field(
        default=None,
        metadata=field_help(
            "Evaluate on a random subset of this many rows (drawn by seed); null: all."
        ),
    )

    def __post_init__(self) -> None:
        for name in ("max_train_examples", "max_eval_examples", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {value}")
        one_file, mixed = "with a single data.train_file", "give data.train_file as a list"
        several = isinstance(self.train_file, list)
        requires(self, "train_weights", several, scope="data", because=one_file, advice=mixed)
        evaluation = ("eval_split", "max_eval_examples")
        requires(self, evaluation, bool(self.eval_file), "eval_file", scope="data")
