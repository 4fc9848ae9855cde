"""Direct preference optimisation and its family (DPO, IPO, hinge/SLiC, robust DPO, and the
reference-free SimPO and ORPO, which skip the reference pass below).

Per step: one forward pass of the policy over the 2B rows of B pairs (chosen rows, then
rejected), summed response log-probs, and the loss from `ops.dpo_loss` against *cached*
reference log-probs. The reference pass runs once per dataset before the first step, with the
initial policy (or the policy with its LoRA adapter disabled, or a separate reference model),
and is saved in the run directory, so it is neither repeated each epoch nor on resume, and no
second model stays in memory during training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from alignkit.data import PreferenceCollator, tokenize_preferences
from alignkit.models.forward import innermost_model, response_logps
from alignkit.models.loading import weights_digest
from alignkit.models.tied import accumulate_tied_embedding_grad
from alignkit.ops.preference import (
    dpo_loss,
    is_reference_free,
    length_normalized_logps,
    length_normalized_nll,
    reference_free_dpo_loss,
)
from alignkit.ops.stats import pairwise_accuracy
from alignkit.tracking.run_dir import RunDir
from alignkit.trainers.common import (
    DataConfig,
    gather_per_example,
    load_model_and_tokenizer,
    load_split,
    number_examples,
    require_train_file,
    split_pairs,
)
from alignkit.trainers.dpo_config import DPOConfig, DPOLossConfig  # noqa: F401  (re-exported)
from alignkit.trainers.loop import Metrics, Trainer
from alignkit.trainers.reference import ReferencePolicy

REFERENCE_CACHE = RunDir.REFERENCE_CACHE


class DPOTrainer(Trainer):
    """Preference optimisation against cached reference log-probs."""

    progress_metrics = ("loss", "rewards/accuracies", "rewards/margins")

    def __init__(self, config: DPOConfig, model: nn.Module, train: Any, **kwargs: Any) -> None:
        super().__init__(config, model, train, **kwargs)
        self.config: DPOConfig = config

    # --------------------------------------------------------------- reference, once

    @property
    def reference_free(self) -> bool:
        """Whether the loss uses no reference model (then no reference pass runs)."""
        return is_reference_free(self.config.dpo.kind)

    def on_train_begin(self) -> None:
        if self.reference_free:
            return
        datasets = {"train": self.train_dataset}
        if self.eval_dataset is not None:
            datasets["eval"] = self.eval_dataset
        cache = self.run_dir.root / REFERENCE_CACHE
        # Read once, before the first update: the policy itself can stand for the initial one.
        pi_ref = ReferencePolicy(
            self, self.config.reference, dtype=self.config.model.dtype, snapshot=False
        )
        with pi_ref.use() as reference:
            fingerprint = self._reference_fingerprint(reference, datasets)
            tables, why = _read_cache(cache, fingerprint)
            if tables is None:
                self._say(f"reference log-probs: computed ({why})")
                tables = self._reference_pass(reference, datasets)
                if self.accelerator.is_main_process:
                    _write_cache(cache, fingerprint, tables)
            else:
                self._say(f"reference log-probs: reused from {cache}")
        for name, data in datasets.items():
            for example, (chosen, rejected) in zip(data, tables[name].tolist(), strict=True):
                example["ref_chosen_logp"] = chosen
                example["ref_rejected_logp"] = rejected

    def _reference_pass(self, reference: nn.Module, datasets: dict[str, Any]) -> dict[str, Tensor]:
        """Summed response log-probs of every pair under `reference`, with a progress bar."""
        show = self.config.logging.progress_bar and self.accelerator.is_main_process
        with Progress(
            TextColumn("reference log-probs {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not show,
        ) as progress:
            tables = {}
            for name, data in datasets.items():
                task = progress.add_task(name, total=len(data))

                def pair_logps(batch: dict[str, Tensor], task: Any = task) -> Tensor:
                    logps = response_logps(reference, batch, packed=self.config.model.packed)
                    logps = torch.stack(split_pairs(logps), dim=-1)
                    rows = len(logps) * self.accelerator.num_processes
                    progress.advance(task, rows)
                    return logps

                tables[name] = gather_per_example(self, data, pair_logps, width=2)
        return tables

    def _reference_fingerprint(self, reference: nn.Module, datasets: dict[str, Any]) -> str:
        """A digest of everything the cached values depend on: the reference's weights (the
        adapter excluded: the reference runs with it off), dtype, mixed precision, tokenizer
        vocabulary, the token ids of every pair, max length and the reference setting."""
        cfg = self.config
        digest = hashlib.sha256()
        # dtype and max length also show in the weights and token ids; precision (autocast)
        # shows nowhere else.
        settings = (cfg.reference, cfg.model.dtype, cfg.data.max_length, cfg.data.length_policy)
        digest.update(repr((*settings, self.precision.name)).encode())
        digest.update(weights_digest(self.accelerator.unwrap_model(reference)).encode())
        if self.tokenizer is not None:
            digest.update(repr(sorted(self.tokenizer.get_vocab().items())).encode())
        for name, data in datasets.items():
            digest.update(name.encode())
            for example in data:
                for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                    digest.update(repr(example[key]).encode())
        return digest.hexdigest()

    # --------------------------------------------------------------- the algorithm

    def policy_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed response log-probs of the chosen and rejected rows, ``[B]`` each."""
        return split_pairs(response_logps(model, batch, packed=self.config.model.packed))

    def compute_loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Metrics]:
        chosen, rejected = self.policy_logps(model, batch)
        chosen_lengths, rejected_lengths = response_lengths(batch)
        cfg = self.config.dpo
        if self.reference_free:
            losses, chosen_rewards, rejected_rewards = reference_free_dpo_loss(
                length_normalized_logps(chosen, chosen_lengths),
                length_normalized_logps(rejected, rejected_lengths),
                beta=cfg.beta,
                kind=cfg.kind,
                gamma=cfg.simpo_gamma,
            )
        else:
            loss_inputs = (chosen, rejected, batch["ref_chosen_logp"], batch["ref_rejected_logp"])
            if cfg.length_normalize:
                lengths = (chosen_lengths, rejected_lengths) * 2
                loss_inputs = tuple(
                    length_normalized_logps(logps, n)
                    for logps, n in zip(loss_inputs, lengths, strict=True)
                )
            losses, chosen_rewards, rejected_rewards = self.preference_loss(*loss_inputs)
        metrics = preference_metrics(chosen, rejected, chosen_rewards, rejected_rewards)
        if cfg.nll_weight > 0:
            losses, nll = self.add_winner_nll(losses, chosen, chosen_lengths)
            metrics["nll_loss"] = nll.mean()
        return losses.mean(), metrics

    def loss_units(self, batch: Mapping[str, Any]) -> int:
        """Pairs: the loss is a per-pair mean over the optimizer step."""
        return batch["input_ids"].shape[0] // 2  # chosen rows, then rejected rows

    def add_winner_nll(
        self, losses: Tensor, winner_logps: Tensor, winner_lengths: Tensor
    ) -> tuple[Tensor, Tensor]:
        """RPO: ``losses + nll_weight * NLL(winner)`` per pair, and the NLL (detached)."""
        nll = length_normalized_nll(winner_logps, winner_lengths)
        return losses + self.config.dpo.nll_weight * nll, nll.detach()

    def preference_loss(
        self, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.config.dpo
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen.to(chosen.dtype),
            ref_rejected.to(chosen.dtype),
            beta=cfg.beta,
            kind=cfg.kind,
            label_smoothing=cfg.label_smoothing,
        )


def preference_metrics(
    chosen: Tensor, rejected: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor
) -> dict[str, Tensor]:
    """TRL's metric names: implicit rewards, their margin and accuracy, policy log-probs.

    Accuracy is ``pairwise_accuracy``: a tie counts as half (at step 0 every margin is 0).
    """
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": pairwise_accuracy(chosen_rewards, rejected_rewards),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }


def response_lengths(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Response token counts of the chosen and rejected rows, ``[B]`` each."""
    return split_pairs(batch["response_mask"].sum(dim=-1))


def _read_cache(path: Path, fingerprint: str) -> tuple[dict[str, Tensor] | None, str]:
    """The cached tables if `path` holds them for `fingerprint`, else None and why not."""
    if not path.is_file():
        return None, "no cache yet"
    cached = torch.load(path, weights_only=True)
    if cached.get("fingerprint") != fingerprint:
        return None, f"{path} is for another model, dtype, tokenizer or data"
    return cached["tables"], ""


def _write_cache(path: Path, fingerprint: str, tables: dict[str, Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": fingerprint, "tables": tables}, tmp)
    tmp.replace(path)


def tokenize_pairs(records: Any, tokenizer: Any, data: DataConfig, extra_fields: Any = None) -> Any:
    """Tokenised, numbered pairs (the number keys cached per-example values)."""
    pairs = tokenize_preferences(
        records,
        tokenizer,
        data.max_length,
        data.length_policy,
        extra_fields=extra_fields,
        max_prompt_length=data.max_prompt_length,
    )
    return number_examples(pairs)


def build_preference_trainer(
    trainer_cls: type[DPOTrainer], cfg: DPOConfig, fmt: str, extra_fields: Any = None
) -> DPOTrainer:
    """Load model and data for a DPO-family trainer and return it ready to train."""
    require_train_file(cfg.data)
    train_records = load_split(cfg.data, fmt, "train", cfg.seed)
    eval_records = load_split(cfg.data, fmt, "eval", cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
    # A tied embedding's two gradients go into one tensor instead of a fresh [V, H] sum.
    accumulate_tied_embedding_grad(innermost_model(model))
    train = tokenize_pairs(train_records, tokenizer, cfg.data, extra_fields)
    evaluation = (
        tokenize_pairs(eval_records, tokenizer, cfg.data, extra_fields) if eval_records else None
    )
    return trainer_cls(
        cfg,
        model,
        train,
        collate_fn=PreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        eval_dataset=evaluation,
        tokenizer=tokenizer,
    )


def build_dpo_trainer(cfg: DPOConfig) -> DPOTrainer:
    return build_preference_trainer(DPOTrainer, cfg, "preference", extra_fields=[])


def train_dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Run DPO (or IPO/hinge/robust); returns the run summary."""
    return build_dpo_trainer(cfg).train()
