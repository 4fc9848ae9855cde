"""Reward models (``rm``) and cost models (``cost``): a backbone plus a scalar head trained on pairs.

Both kinds score the 2B rows of B pairs (chosen rows, then rejected) in one forward pass and
split the scores into chosen and rejected; pooling ``last`` reads the last real token of
prompt + response, so the whole exchange is scored.

- ``kind: reward`` (seed 002 §4.3): ``reward_model_loss`` (Bradley-Terry, margin-weighted or
  hinge; the data's ``margin`` field when ``use_margin``), plus auxiliary heads through
  ``multitask_reward_loss`` (seed 002 §4.3.4). Trains on preference data, or on safety
  preferences, whose chosen/rejected order is the helpfulness order.
- ``kind: cost`` (Safe RLHF, Dai et al. 2023, arXiv:2310.12773, eq. 6): ``cost_model_loss``, a
  Bradley-Terry term on the safety order (the less safe response costs more) plus a sign term
  on the safe/unsafe labels, so that cost > 0 means unsafe. Trains on safety preferences.

Evaluation is exact over the held-out pairs (not a mean of batch means), with the training
metric names under ``eval/``. Checkpoints are reward-model directories: ``load_reward_model(
"<run>/checkpoints/step-N/model")`` restores one in one call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.data import PreferenceCollator, tokenize_preferences
from alignkit.data.loaders import DEFAULT_MAX_PROBLEMS, RecordSet
from alignkit.errors import ConfigError, DataError, RowProblem
from alignkit.models import RewardModel, load_reward_model
from alignkit.models.reward import load_reward_checkpoint
from alignkit.ops.preference import (
    cost_model_loss,
    multitask_reward_loss,
    orient_pairs,
)
from alignkit.ops.stats import pairwise_accuracy
from alignkit.trainers.common import (
    load_split,
    require_train_file,
    split_pairs,
)
from alignkit.trainers.loop import Metrics, Trainer
from alignkit.trainers.reward_config import (  # noqa: F401  (re-exported)
    RewardConfig,
    RewardHeadConfig,
    TaskWeightsConfig,
)

#: Per-response targets of each auxiliary head, as fields of a row.
AUX_TARGET_FIELDS = {
    "helpfulness": ("chosen_helpfulness", "rejected_helpfulness"),
    "safety": ("chosen_is_safe", "rejected_is_safe"),
}
#: What the cost loss reads from each (normalised safety-preference) row.
COST_FIELDS = ("chosen_safety", "rejected_safety", "chosen_is_safe", "rejected_is_safe")


class RewardTrainer(Trainer):
    """Trains a ``RewardModel`` as a reward model (Bradley-Terry family, optional aux heads);
    :class:`CostTrainer` overrides the loss for cost models."""

    progress_metrics = ("loss", "accuracy")

    def __init__(
        self,
        config: RewardConfig,
        model: RewardModel,
        train_dataset: Any,
        *,
        use_margin: bool = False,
        **kwargs: Any,
    ) -> None:
        """``use_margin``: the data carries a ``margin`` per pair and the loss should use it."""
        super().__init__(config, model, train_dataset, **kwargs)
        self.config: RewardConfig = config
        self.use_margin = use_margin
        self.aux_heads = tuple(model.reward_config.aux_heads)

    # ------------------------------------------------------------------ the algorithm

    def compute_loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        return self.loss_and_metrics(self.pair_values(model, batch))

    def loss_units(self, batch: Mapping[str, Any]) -> int:
        """Pairs: the loss is a per-pair mean over the optimizer step."""
        return batch["input_ids"].shape[0] // 2  # chosen rows, then rejected rows

    def pair_values(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Scores of both responses of each pair and the targets the loss reads, each ``[B]``.

        Keys: ``chosen``, ``rejected``, ``<side>_aux_<head>``, plus the batch's target fields
        (``margin``, safety scores and labels, helpfulness scores) as float tensors.
        """
        output = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            packed=self.config.model.packed,
        )
        values: dict[str, Tensor] = {}
        values["chosen"], values["rejected"] = split_pairs(output.rewards)
        for name, scores in output.aux.items():
            values[f"chosen_aux_{name}"], values[f"rejected_aux_{name}"] = split_pairs(scores)
        for key in self._target_fields():
            values[key] = batch[key].float()
        return values

    def loss_and_metrics(self, pairs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and metrics of a set of pairs (a batch, or the whole eval set)."""
        chosen_aux, rejected_aux = (
            {name: pairs[f"{side}_aux_{name}"] for name in self.aux_heads}
            for side in ("chosen", "rejected")
        )
        targets = {
            name: (pairs[AUX_TARGET_FIELDS[name][0]], pairs[AUX_TARGET_FIELDS[name][1]])
            for name in self.aux_heads
        }
        loss, parts = multitask_reward_loss(
            pairs["chosen"],
            pairs["rejected"],
            kind=self.config.loss,
            chosen_aux=chosen_aux,
            rejected_aux=rejected_aux,
            margin=pairs["margin"] if self.use_margin else None,
            helpfulness=targets.get("helpfulness"),
            is_safe=targets.get("safety"),
            task_weights=asdict(self.config.reward_model.task_weights),
        )
        r_chosen, r_rejected = pairs["chosen"].detach().float(), pairs["rejected"].detach().float()
        metrics = {
            "accuracy": pairwise_accuracy(r_chosen, r_rejected),
            "rewards/chosen": r_chosen.mean(),
            "rewards/rejected": r_rejected.mean(),
            "rewards/margins": (r_chosen - r_rejected).mean(),
        }
        if self.aux_heads:
            metrics.update({f"loss_{name}": value for name, value in parts.items()})
        if "safety" in self.aux_heads:
            # The safety head's logit is that the response is safe (label 1 = safe).
            predicted = torch.cat([pairs["chosen_aux_safety"], pairs["rejected_aux_safety"]]) > 0
            labels = torch.cat([pairs["chosen_is_safe"], pairs["rejected_is_safe"]]) > 0.5
            metrics["safety_head_accuracy"] = (predicted == labels).float().mean()
        return loss, metrics

    def _target_fields(self) -> list[str]:
        fields = ["margin"] if self.use_margin else []
        for name in self.aux_heads:
            fields.extend(AUX_TARGET_FIELDS[name])
        return fields

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Loss and metrics over all held-out pairs at once (exact, not a mean of batches)."""
        if self.eval_loader is None:
            return {}
        collected: dict[str, list[Tensor]] = {}
        with torch.no_grad():
            for batch in self.eval_loader:
                with self.accelerator.autocast():
                    values = self.pair_values(self.model, batch)
                values = {key: value.float() for key, value in values.items()}
                for key, value in self.accelerator.gather_for_metrics(values).items():
                    collected.setdefault(key, []).append(value)
            pairs = {key: torch.cat(parts) for key, parts in collected.items()}
            loss, metrics = self.loss_and_metrics(pairs)
        return {f"eval/{name}": float(value) for name, value in {"loss": loss, **metrics}.items()}

    # ------------------------------------------------------------------ checkpoints

    def restore_model_weights(self, model: nn.Module, directory: Path) -> None:
        load_reward_checkpoint(model, directory)


class CostTrainer(RewardTrainer):
    """Trains a ``RewardModel`` as a cost model (Safe RLHF eq. 6: cost > 0 = unsafe)."""

    progress_metrics = ("loss", "accuracy", "sign_accuracy")

    def loss_and_metrics(self, pairs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        c_chosen, c_rejected = pairs["chosen"], pairs["rejected"]
        delta_safety = pairs["chosen_safety"] - pairs["rejected_safety"]
        chosen_unsafe = 1.0 - pairs["chosen_is_safe"]
        rejected_unsafe = 1.0 - pairs["rejected_is_safe"]
        pairwise, sign = cost_model_loss(
            c_chosen, c_rejected, delta_safety, chosen_unsafe, rejected_unsafe
        )
        c_chosen, c_rejected = c_chosen.detach().float(), c_rejected.detach().float()
        # The less safe response of a pair must cost more; pairs of equal safety have no order.
        # A batch without an ordered pair (possible with flattened data, where two answers to
        # a benign prompt tie) counts as 0: a NaN would poison the whole logging window.
        less_safe, safer = orient_pairs(c_rejected, c_chosen, flip=delta_safety <= 0)
        accuracy = pairwise_accuracy(less_safe, safer, mask=delta_safety != 0)
        costs = torch.cat([c_chosen, c_rejected])
        unsafe = torch.cat([chosen_unsafe, rejected_unsafe]) > 0.5
        metrics = {
            "loss_pairwise": pairwise.mean().detach(),
            "loss_sign": sign.mean().detach(),
            "accuracy": accuracy,
            "sign_accuracy": ((costs > 0) == unsafe).float().mean(),
            "costs/chosen": c_chosen.mean(),
            "costs/rejected": c_rejected.mean(),
        }
        return (pairwise + sign).mean(), metrics

    def _target_fields(self) -> list[str]:
        return list(COST_FIELDS)


# ---------------------------------------------------------------------- data


def _missing_field_error(
    head: str, fields: tuple[str, ...], records: RecordSet, why: str
) -> ConfigError:
    return ConfigError(
        f"reward_model.aux_heads includes '{head}', which needs the fields "
        f"{' and '.join(fields)} in every row, but {records.source} has no field "
        f"'{fields[0]}' ({why})"
    )


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):  # CSV cells are text
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def attach_helpfulness(records: RecordSet, max_problems: int = DEFAULT_MAX_PROBLEMS) -> None:
    """Turn each record's ``chosen_helpfulness``/``rejected_helpfulness`` into numbers, in
    place: the per-response targets of the helpfulness head, kept from the file by
    ``load_records(..., keep_fields=...)`` (the record formats keep only their own fields).

    Raises:
        ConfigError: no row has the fields. DataError: some rows lack them or hold non-numbers.
    """
    fields = AUX_TARGET_FIELDS["helpfulness"]
    if not any(fields[0] in record for record in records):
        raise _missing_field_error(
            "helpfulness", fields, records, "per-response helpfulness scores, any numbers"
        )
    problems: list[RowProblem] = []
    for record, row in zip(records, records.rows, strict=True):
        for name in fields:
            if name not in record:
                problems.append(RowProblem(records.source, row, name, "missing field"))
                continue
            number = _as_number(record[name])
            if number is None:
                message = f"expected a finite number, got {record[name]!r}"
                problems.append(RowProblem(records.source, row, name, message))
                continue
            record[name] = number
    if problems:
        raise DataError(
            problems[:max_problems],
            total=len(problems),
            note="helpfulness targets",
            rows=len({p.row for p in problems}),
        )


def prepare_records(cfg: RewardConfig, records: RecordSet) -> None:
    """Check that `records` carry what the loss and the aux heads need; attach helpfulness."""
    for head in cfg.reward_model.aux_heads:
        if head == "helpfulness":
            attach_helpfulness(records, cfg.data.max_problems)
        elif any(AUX_TARGET_FIELDS[head][0] not in record for record in records):
            raise _missing_field_error(
                head,
                AUX_TARGET_FIELDS[head],
                records,
                f"format {records.format!r} has no safe/unsafe labels; use safety-preference "
                "data with data_format=safety_preference",
            )


def build_reward_trainer(cfg: RewardConfig) -> RewardTrainer:
    """Load the data, the backbone with its heads and the tokenizer; return a ready trainer."""
    require_train_file(cfg.data)
    fmt = cfg.resolved_data_format
    # The helpfulness head's targets are columns of the file beside the format's own fields.
    keep = AUX_TARGET_FIELDS["helpfulness"] if "helpfulness" in cfg.reward_model.aux_heads else ()
    train_records = load_split(cfg.data, fmt, "train", cfg.seed, keep_fields=keep)
    eval_records = load_split(cfg.data, fmt, "eval", cfg.seed, keep_fields=keep)
    for records in (train_records, eval_records):
        if records is not None:
            prepare_records(cfg, records)
    use_margin = cfg.kind == "reward" and cfg.use_margin and "margin" in train_records[0]
    if use_margin and eval_records is not None and "margin" not in eval_records[0]:
        raise ConfigError(
            f"{cfg.data.train_file} has a margin field but {cfg.data.eval_file} has none: give "
            "both files margins, or set use_margin=false"
        )
    model, tokenizer = load_reward_model(
        cfg.model.name,
        head=cfg.reward_model.head,
        pooling=cfg.reward_model.pooling,
        aux_heads=tuple(cfg.reward_model.aux_heads),
        kind=cfg.kind,
        mlp_dropout=cfg.reward_model.mlp_dropout,
        dtype=cfg.model.dtype,
        seed=cfg.seed,
    )
    model.train()

    def tokenize(records: RecordSet) -> Any:
        data = cfg.data
        return tokenize_preferences(
            records,
            tokenizer,
            data.max_length,
            data.length_policy,
            max_prompt_length=data.max_prompt_length,
        )

    trainer_class = CostTrainer if cfg.kind == "cost" else RewardTrainer
    return trainer_class(
        cfg,
        model,
        tokenize(train_records),
        use_margin=use_margin,
        collate_fn=PreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        eval_dataset=tokenize(eval_records) if eval_records is not None else None,
        tokenizer=tokenizer,
    )


def train_reward(cfg: RewardConfig) -> dict[str, Any]:
    """Train a reward or cost model; returns the run summary."""
    return build_reward_trainer(cfg).train()
