"""Supervised fine-tuning: cross-entropy on the completion, the prompt masked out.

Labels are prompt + completion with the prompt part set to -100 (seed 002 §4.2.2, corrected in
seeds/NOTES.md: the seed builds labels of the prompt's length only). The loss is the mean
negative log-likelihood over all completion tokens of the optimizer step ("token-mean"), whatever
its split into micro-batches and processes (see alignkit.runloop.optimizer).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from alignkit.data import SFTCollator, tokenize_sft
from alignkit.data.packing import PackedSFTCollator, pack_examples
from alignkit.data.tokenize import IGNORE_INDEX
from alignkit.models.forward import innermost_model, segment_logprobs, token_logprobs
from alignkit.models.tied import accumulate_tied_embedding_grad
from alignkit.ops.stats import masked_mean
from alignkit.trainers.common import (
    load_model_and_tokenizer,
    load_split,
    require_train_file,
)
from alignkit.trainers.loop import Metrics, Trainer
from alignkit.trainers.sft_config import SFTConfig, SFTDataConfig  # noqa: F401  (re-exported)


class SFTTrainer(Trainer):
    """Prompt-masked cross-entropy; logs ``loss``, the mean NLL per completion token of the
    optimizer step (all its micro-batches and processes: ``loss_units``)."""

    progress_metrics = ("loss",)

    def compute_loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        completion = batch["labels"] != IGNORE_INDEX
        if "position_ids" in batch:  # packed rows: several examples each
            token_logps = segment_logprobs(
                model, batch, completion, packed=self.config.model.packed
            )
        else:
            token_logps = token_logprobs(model, batch, completion)
        loss = -masked_mean(token_logps, completion)
        return loss, {}

    def loss_units(self, batch: dict[str, Tensor]) -> Tensor:
        """Completion tokens: the step's loss is the mean NLL over all of them."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def count_tokens(self, batch: Any) -> Tensor:
        if "num_tokens" in batch:  # packed: the attention mask is [B, 1, T, T]
            return batch["num_tokens"]
        return batch["attention_mask"].sum()


def build_sft_trainer(cfg: SFTConfig) -> SFTTrainer:
    """Load model, tokenizer and data as `cfg` says and return a ready trainer."""
    require_train_file(cfg.data)
    train_records = load_split(cfg.data, "sft", "train", cfg.seed)
    eval_records = load_split(cfg.data, "sft", "eval", cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
    # A tied embedding's two gradients go into one tensor instead of a fresh [V, H] sum.
    accumulate_tied_embedding_grad(innermost_model(model))

    def tokenize(records: Any) -> Any:
        data = cfg.data
        return tokenize_sft(
            records,
            tokenizer,
            data.max_length,
            data.length_policy,
            data.max_prompt_length,
            assistant_turns=data.assistant_turns,
        )

    train = tokenize(train_records)
    evaluation = tokenize(eval_records) if eval_records else None
    collate: Any = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    if cfg.packing:
        train = pack_examples(train, cfg.data.max_length)
        evaluation = pack_examples(evaluation, cfg.data.max_length) if evaluation else None
        collate = PackedSFTCollator(pad_token_id=tokenizer.pad_token_id)
    return SFTTrainer(
        cfg,
        model,
        train,
        collate_fn=collate,
        eval_dataset=evaluation,
        tokenizer=tokenizer,
    )


def train_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run SFT; returns the run summary."""
    return build_sft_trainer(cfg).train()
