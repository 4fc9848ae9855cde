"""Pieces every method trainer shares: loading the model and the data, per-example tables.

The model and data settings (`ModelConfig`, `LoraConfig`, `DataConfig`) are defined in the
torch-free `alignkit.config.inputs` and re-exported here. Model-forward helpers (token log-probs) live in `alignkit.models.forward`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit.config.inputs import DataConfig, LoraConfig, ModelConfig
from alignkit.data import load_records
from alignkit.data.loaders import KeepFields, RecordSet, mix_record_sets
from alignkit.errors import ConfigError
from alignkit.models import LoraSettings, load_policy

logger = logging.getLogger("alignkit.trainers")

__all__ = [
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "gather_per_example",
    "load_model_and_tokenizer",
    "load_split",
    "number_examples",
    "require_train_file",
    "split_pairs",
]


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
    data: DataConfig,
    fmt: str,
    split: Literal["train", "eval"],
    seed: int = 0,
    keep_fields: KeepFields = (),
) -> RecordSet | None:
    """Validated records of the train or eval file (None when no eval file is set), subsampled
    to ``data.max_{split}_examples`` rows when that is set; ``keep_fields`` as for
    ``load_records``."""
    path = data.train_file if split == "train" else data.eval_file
    if not path:
        return None
    which = data.train_split if split == "train" else data.eval_split
    if isinstance(path, list):
        parts = [
            load_records(
                p, fmt, split=which, max_problems=data.max_problems, keep_fields=keep_fields
            )
            for p in path
        ]
        weights = data.train_weights or [1.0] * len(parts)
        if len(weights) != len(parts):
            raise ConfigError(
                f"data.train_weights has {len(weights)} weights for {len(parts)} train files"
            )
        records = mix_record_sets(parts, weights, seed)
    else:
        records = load_records(
            path, fmt, split=which, max_problems=data.max_problems, keep_fields=keep_fields
        )
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
