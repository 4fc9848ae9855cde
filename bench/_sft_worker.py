"""One timed SFT run, alignkit or TRL, in its own process (started by bench/train_cases.py).

Settings:

- ``alignkit``: alignkit's ``SFTTrainer``, right-padded batches of ``--batch`` examples.
- ``alignkit-packing``: ``packing=True``: ``--rows`` rows of up to ``--max-length`` tokens per
  step, several examples per row (block-diagonal attention, positions restarting per example).
- ``trl``: TRL's ``SFTTrainer``, right-padded batches of ``--batch`` examples.
- ``trl-packing``: TRL with ``packing=True`` (strategy ``bfd``, which makes it padding-free: the
  step's ``--rows`` packed rows are flattened into one sequence with restarting positions).

alignkit reads the prompt/completion text (``--data``) and tokenises it itself; TRL gets the
token ids and labels alignkit's ``tokenize_sft`` made of the same rows (``--tokens``), so both
train on exactly the same tokens with the same completion-only labels (checked by the driver
from the per-run token counts). Each forward pass is counted by a hook (examples, non-pad
tokens, completion tokens scored by the loss), each optimizer step's end by another.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from _frameworks import (
    alignkit_offline_args,
    count_alignkit_steps,
    timed_trl_trainer,
    trl_offline_args,
)
from _harness import StepCounter, timed_training, window_result, worker_main, worker_parser

SETTINGS = ("alignkit", "alignkit-packing", "trl", "trl-packing")


def _count_alignkit(batch: dict[str, Any], _: Any = None) -> tuple[Any, Any, Any]:
    scored = (batch["labels"] != -100).sum()
    if "num_tokens" in batch:  # packed: padding positions have position 0, like example starts
        tokens = batch["num_tokens"]
        padding = batch["position_ids"].numel() - tokens
        return (batch["position_ids"] == 0).sum() - padding, tokens, scored
    return batch["input_ids"].shape[0], batch["attention_mask"].sum(), scored


def _count_trl(inputs: dict[str, Any]) -> tuple[Any, Any, Any]:
    scored = (inputs["labels"] != -100).sum()
    if "attention_mask" in inputs:
        return inputs["input_ids"].shape[0], inputs["attention_mask"].sum(), scored
    positions = inputs["position_ids"]  # padding-free: one row, positions restart per example
    return (positions == 0).sum(), positions.numel(), scored


def build_alignkit(args: argparse.Namespace, counter: StepCounter) -> Any:
    from alignkit.trainers.sft import SFTConfig, SFTDataConfig, build_sft_trainer

    packing = args.setting == "alignkit-packing"
    config = SFTConfig(
        **alignkit_offline_args(args),
        max_steps=args.max_steps,
        examples_per_device=args.rows if packing else args.batch,
        packing=packing,
        data=SFTDataConfig(train_file=str(args.data), max_length=args.max_length),
    )
    trainer = build_sft_trainer(config)
    count_alignkit_steps(trainer, counter, _count_alignkit)
    return trainer, trainer.model


def build_trl(args: argparse.Namespace, counter: StepCounter) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    packing = args.setting == "trl-packing"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    with args.tokens.open(encoding="utf-8") as handle:
        dataset = Dataset.from_list([json.loads(line) for line in handle if line.strip()])
    config = SFTConfig(
        max_steps=args.max_steps,
        per_device_train_batch_size=args.rows if packing else args.batch,
        max_length=args.max_length,
        packing=packing,
        packing_strategy="bfd",
        **trl_offline_args(args),
    )
    trainer = timed_trl_trainer(
        SFTTrainer,
        counter,
        _count_trl,
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trainer, model


def dataset_tokens(rows: Any) -> dict[str, int]:
    """Tokens and loss-scored labels of the training set as the trainer holds it (packed or not)."""
    tokens = scored = 0
    for row in rows:
        tokens += len(row["input_ids"])
        scored += sum(1 for label in row["labels"] if label != -100)
    return {"tokens": tokens, "scored": scored}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mfu import non_embedding_parameters

    counter = StepCounter()
    build = build_alignkit if args.setting.startswith("alignkit") else build_trl
    (trainer, model), measures = timed_training(args, functools.partial(build, args, counter))
    return {
        **measures,
        **window_result(counter, args.warmup_steps),
        "non_embedding_parameters": non_embedding_parameters(model),
        "dataset_tokens": dataset_tokens(trainer.train_dataset),
    }


def parser() -> argparse.ArgumentParser:
    out = worker_parser(__doc__.splitlines()[0], SETTINGS)
    out.add_argument("--data", type=Path, required=True, help="JSONL prompt/completion")
    out.add_argument("--tokens", type=Path, required=True, help="JSONL input_ids/labels")
    out.add_argument("--batch", type=int, default=8, help="examples per step, padded")
    out.add_argument("--rows", type=int, default=4, help="packed rows per step")
    out.add_argument("--max-length", type=int, default=128)
    out.add_argument("--max-steps", type=int, default=20)
    return out


if __name__ == "__main__":
    sys.exit(worker_main(parser(), run))
