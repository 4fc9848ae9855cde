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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _timing import StepCounter, peak_rss_mib, rss_mib, window_result

SETTINGS = ("alignkit", "trl")


def build_alignkit(args: argparse.Namespace, counter: StepCounter) -> tuple[Any, Any, dict]:
    from alignkit.config import LoggingConfig, OptimConfig
    from alignkit.trainers.common import DataConfig, ModelConfig
    from alignkit.trainers.reward import RewardConfig, build_reward_trainer

    config = RewardConfig(
        run_name="alignkit",
        output_dir=str(args.work_dir),
        seed=args.seed,
        epochs=1,
        max_steps=args.max_steps,
        examples_per_device=args.batch,
        precision="fp32",
        gradient_checkpointing=False,
        dataloader_workers=0,
        model=ModelConfig(name=str(args.model_dir), dtype="float32"),
        data=DataConfig(train_file=str(args.data), max_length=args.max_length),
        optim=OptimConfig(lr=args.lr, schedule="linear", warmup_steps=0, max_grad_norm=1.0),
        logging=LoggingConfig(every=10, report_to=[], progress_bar=False, plots=False),
    )
    trainer = build_reward_trainer(config)
    count_tokens, after_step = trainer.count_tokens, trainer.after_optimizer_step

    def timed_count_tokens(batch: Any) -> Any:
        counter.count(batch["input_ids"].shape[0] // 2, batch["attention_mask"].sum())
        return count_tokens(batch)

    def timed_after_step(metrics: Any) -> Any:
        counter.step_end(metrics["loss"])
        return after_step(metrics)

    # The trainer's own hooks, wrapped on the instance (build_reward_trainer picks the class).
    trainer.count_tokens, trainer.after_optimizer_step = timed_count_tokens, timed_after_step
    tokens = sum(
        2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
        for e in trainer.train_dataset
    )
    return trainer, trainer.model, {"tokens": tokens, "pairs": len(trainer.train_dataset)}


def build_trl(args: argparse.Namespace, counter: StepCounter) -> tuple[Any, Any, dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    class Timed(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counter.count(inputs["input_ids"].shape[0] // 2, inputs["attention_mask"].sum())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.last_loss = loss[0] if return_outputs else loss
            return loss

    class StepEnd(TrainerCallback):
        trainer: Any = None

        def on_step_end(self, args, state, control, **kwargs):
            counter.step_end(self.trainer.last_loss)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # where the last real token is
    with args.tokens.open(encoding="utf-8") as handle:
        dataset = Dataset.from_list([json.loads(line) for line in handle if line.strip()])
    config = RewardConfig(
        output_dir=str(args.work_dir / "trl"),
        seed=args.seed,
        num_train_epochs=1,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    step_end = StepEnd()
    trainer = Timed(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[step_end],
    )
    step_end.trainer = trainer
    data = trainer.train_dataset
    tokens = sum(
        len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"], strict=True)
    )
    return trainer, model, {"tokens": tokens, "pairs": len(data)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _dpo_worker import _profiled
    from mfu import non_embedding_parameters

    torch.set_num_threads(args.threads)
    counter = StepCounter()
    rss_after_imports = rss_mib()
    started = time.perf_counter()
    build = build_alignkit if args.setting == "alignkit" else build_trl
    trainer, model, dataset = build(args, counter)
    built = time.perf_counter()
    rss_before_train = rss_mib()
    with _profiled(args):
        trainer.train()
    finished = time.perf_counter()
    return {
        "framework": args.setting,
        "threads": args.threads,
        **window_result(counter, args.warmup_steps),
        "non_embedding_parameters": non_embedding_parameters(model),
        "dataset_tokens": dataset,
        "build_s": built - started,
        "train_call_s": finished - built,
        "build_and_train_s": finished - started,
        "rss_after_imports_mib": rss_after_imports,
        "rss_before_train_mib": rss_before_train,
        "peak_rss_mib": peak_rss_mib(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=SETTINGS, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="JSONL prompt/chosen/rejected")
    parser.add_argument("--tokens", type=Path, required=True, help="JSONL chosen_ids/rejected_ids")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--cprofile", type=Path, default=None)
    parser.add_argument("--torch-profile", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported
        os.environ[name] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(run(args)), encoding="utf-8")


if __name__ == "__main__":
    main()
