"""One timed reward-model run, alignkit or TRL, in its own process (started by train_cases.py).

- ``alignkit``: alignkit's ``RewardTrainer``: the backbone (``AutoModel``, no LM head) plus
  alignkit's ``Linear(d, 1)`` head on the last real token (``pooling: last``), Bradley-Terry
  loss with the rows' margins (``-log sigmoid(r_c - r_r - m)``); its defaults run the batch
  padding-free with each pair's prompt computed once (``model.packed``, on by default).
- ``trl``: TRL's ``RewardTrainer`` on ``AutoModelForSequenceClassification(num_labels=1)``: the
  same backbone plus Transformers' ``score`` layer (``Linear(d, 1, bias=False)``, applied at every
  position, the last non-pad one read), the same loss with the same margins.

Same backbone weights, same pairs, same batch (``--batch`` pairs = 2 x batch rows, chosen then
rejected, right-padded, in one forward pass in both); only the head differs (a d+1-weight
layer, initialised differently: it does not change the speed). alignkit reads the text rows
(``--data``); TRL gets the token ids alignkit's ``tokenize_preferences`` made of them
(``--tokens``: prompt + answer + EOS per side), so the tokens are the same.
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

SETTINGS = ("alignkit", "trl")


def _count(batch: Any, _: Any = None) -> tuple[Any, Any]:
    """Pairs and non-pad tokens of a batch (chosen rows, then rejected rows)."""
    return batch["input_ids"].shape[0] // 2, batch["attention_mask"].sum()


def build_alignkit(args: argparse.Namespace, counter: StepCounter) -> tuple[Any, Any, dict]:
    from alignkit.trainers.common import DataConfig
    from alignkit.trainers.reward import RewardConfig, build_reward_trainer

    config = RewardConfig(
        **alignkit_offline_args(args),
        max_steps=args.max_steps,
        examples_per_device=args.batch,
        data=DataConfig(train_file=str(args.data), max_length=args.max_length),
    )
    trainer = build_reward_trainer(config)
    count_alignkit_steps(trainer, counter, _count)
    tokens = sum(
        2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
        for e in trainer.train_dataset
    )
    return trainer, trainer.model, {"tokens": tokens, "pairs": len(trainer.train_dataset)}


def build_trl(args: argparse.Namespace, counter: StepCounter) -> tuple[Any, Any, dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # where the last real token is
    with args.tokens.open(encoding="utf-8") as handle:
        dataset = Dataset.from_list([json.loads(line) for line in handle if line.strip()])
    config = RewardConfig(
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        **trl_offline_args(args),
    )
    trainer = timed_trl_trainer(
        RewardTrainer,
        counter,
        _count,
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    data = trainer.train_dataset
    tokens = sum(
        len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"], strict=True)
    )
    return trainer, model, {"tokens": tokens, "pairs": len(data)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mfu import non_embedding_parameters

    counter = StepCounter()
    build = build_alignkit if args.setting == "alignkit" else build_trl
    (_, model, dataset), measures = timed_training(args, functools.partial(build, args, counter))
    return {
        **measures,
        **window_result(counter, args.warmup_steps),
        "non_embedding_parameters": non_embedding_parameters(model),
        "dataset_tokens": dataset,
    }


def parser() -> argparse.ArgumentParser:
    out = worker_parser(__doc__.splitlines()[0], SETTINGS)
    out.add_argument("--data", type=Path, required=True, help="JSONL prompt/chosen/rejected")
    out.add_argument("--tokens", type=Path, required=True, help="JSONL chosen_ids/rejected_ids")
    out.add_argument("--batch", type=int, default=8, help="pairs per step")
    out.add_argument("--max-length", type=int, default=128)
    out.add_argument("--max-steps", type=int, default=20)
    return out


if __name__ == "__main__":
    sys.exit(worker_main(parser(), run))
