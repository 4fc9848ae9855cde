"""Pieces every method trainer shares: model and data settings, loading, per-example tables.

Model-forward helpers (token log-probs) live in `alignkit.models.forward`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit.config.schema import field_help, requires
from alignkit.data import load_records
from alignkit.data.loaders import RecordSet, mix_record_sets
from alignkit.errors import ConfigError
from alignkit.models import LoraSettings, load_policy

logger = logging.getLogger("alignkit.trainers")


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


def require_train_file(data: DataConfig) -> None:
    if not data.train_file:
        raise ConfigError("data.train_file is required (a JSONL/JSON/CSV/Parquet file)")


def load_model_and_tokenizer(model: ModelConfig, seed: int) -> tuple[nn.Module, Any]:
    """The policy (with a LoRA adapter if asked) and its tokenizer, in training mode."""
    lora = None
    if model.lora is not None:
        lora = LoraSettings(
            r=model.lora.r,
            alpha=model.lora.alpha,
            dropout=model.lora.dropout,
            target_modules=(
                model.lora.target_modules
                if isinstance(model.lora.target_modules, str)
                else tuple(model.lora.target_modules)
            ),
        )
    policy, tokenizer = load_policy(model.name, dtype=model.dtype, lora=lora, seed=seed)
    policy.train()
    return policy, tokenizer


def load_split(
    data: DataConfig, fmt: str, split: Literal["train", "eval"], seed: int = 0
) -> RecordSet | None:
    """Validated records of the train or eval file (None when no eval file is set), subsampled
    to ``data.max_{split}_examples`` rows when that is set."""
    path = data.train_file if split == "train" else data.eval_file
    if not path:
        return None
    which = data.train_split if split == "train" else data.eval_split
    if isinstance(path, list):
        parts = [load_records(p, fmt, split=which, max_problems=data.max_problems) for p in path]
        weights = data.train_weights or [1.0] * len(parts)
        if len(weights) != len(parts):
            raise ConfigError(
                f"data.train_weights has {len(weights)} weights for {len(parts)} train files"
            )
        records = mix_record_sets(parts, weights, seed)
    else:
        records = load_records(path, fmt, split=which, max_problems=data.max_problems)
    limit = data.max_train_examples if split == "train" else data.max_eval_examples
    if limit is not None and limit < len(records):
        logger.info(
            "%s: using %d of %d rows (data.max_%s_examples)", path, limit, len(records), split
        )
        records = records.sample(limit, seed)
    return records


def number_examples(examples: Any) -> Any:
    """Give each example its position as ``index`` (to attach per-example cached values)."""
    for i, example in enumerate(examples):
        example["index"] = i
    return examples


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """``[2B]`` values of a preference batch -> (chosen ``[B]``, rejected ``[B]``)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


@torch.no_grad()
def gather_per_example(trainer: Any, dataset: Any, compute: Any, width: int) -> Tensor:
    """Run ``compute(batch) -> [rows_in_batch, width]`` over `dataset` once, on every process's
    shard, and return the full ``[len(dataset), width]`` table on every process.

    Used for values computed once before training (reference log-probs, cost-model scores).
    """
    loader = trainer.ordered_loader(dataset)
    table = torch.full((len(dataset), width), float("nan"))
    for batch in loader:
        values = compute(batch).float()
        index, values = trainer.accelerator.gather_for_metrics((batch["index"], values))
        table[index.cpu()] = values.cpu()
    if torch.isnan(table).any():
        missing = int(torch.isnan(table).any(-1).sum())
        raise RuntimeError(f"{missing} example(s) were not covered by the per-example pass")
    return table
