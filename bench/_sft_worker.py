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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _timing import StepCounter, peak_rss_mib, rss_mib, window_result

SETTINGS = ("alignkit", "alignkit-packing", "trl", "trl-packing")


def _count_alignkit(batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    scored = (batch["labels"] != -100).sum()
    if "num_tokens" in batch:  # packed: padding positions have position 0, like example starts
        tokens = batch["num_tokens"]
        padding = batch["position_ids"].numel() - tokens
        return (batch["position_ids"] == 0).sum() - padding, tokens, scored
    return batch["input_ids"].shape[0], batch["attention_mask"].sum(), scored


def build_alignkit(args: argparse.Namespace, counter: StepCounter) -> Any:
    from alignkit.config import LoggingConfig, OptimConfig
    from alignkit.trainers.common import ModelConfig
    from alignkit.trainers.sft import SFTConfig, SFTDataConfig, build_sft_trainer

    packing = args.setting == "alignkit-packing"
    config = SFTConfig(
        run_name="alignkit",
        output_dir=str(args.work_dir),
        seed=args.seed,
        epochs=1,
        max_steps=args.max_steps,
        examples_per_device=args.rows if packing else args.batch,
        precision="fp32",
        gradient_checkpointing=False,
        dataloader_workers=0,
        packing=packing,
        model=ModelConfig(name=str(args.model_dir), dtype="float32"),
        data=SFTDataConfig(train_file=str(args.data), max_length=args.max_length),
        optim=OptimConfig(lr=args.lr, schedule="linear", warmup_steps=0, max_grad_norm=1.0),
        logging=LoggingConfig(every=10, report_to=[], progress_bar=False, plots=False),
    )

    trainer = build_sft_trainer(config)
    count_tokens, after_step = trainer.count_tokens, trainer.after_optimizer_step

    def timed_count_tokens(batch: Any) -> Any:
        counter.count(*_count_alignkit(batch))
        return count_tokens(batch)

    def timed_after_step(metrics: Any) -> Any:
        counter.step_end(metrics["loss"])
        return after_step(metrics)

    # The trainer's own hooks, wrapped on the instance (build_sft_trainer picks the class).
    trainer.count_tokens, trainer.after_optimizer_step = timed_count_tokens, timed_after_step
    return trainer, trainer.model


def build_trl(args: argparse.Namespace, counter: StepCounter) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    packing = args.setting == "trl-packing"

    class Timed(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scored = (inputs["labels"] != -100).sum()
            if "attention_mask" in inputs:
                counter.count(inputs["input_ids"].shape[0], inputs["attention_mask"].sum(), scored)
            else:  # padding-free: one flattened row, positions restart at every example
                positions = inputs["position_ids"]
                counter.count((positions == 0).sum(), positions.numel(), scored)
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.last_loss = loss[0] if return_outputs else loss
            return loss

    class StepEnd(TrainerCallback):
        trainer: Any = None

        def on_step_end(self, args, state, control, **kwargs):
            counter.step_end(self.trainer.last_loss)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    with args.tokens.open(encoding="utf-8") as handle:
        dataset = Dataset.from_list([json.loads(line) for line in handle if line.strip()])
    config = SFTConfig(
        output_dir=str(args.work_dir / "trl"),
        seed=args.seed,
        num_train_epochs=1,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.rows if packing else args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        packing=packing,
        packing_strategy="bfd",
        # fp32 like alignkit; TRL would default to bf16 autocast and gradient checkpointing.
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
    return trainer, model


def dataset_tokens(rows: Any) -> dict[str, int]:
    """Tokens and loss-scored labels of the training set as the trainer holds it (packed or not)."""
    tokens = scored = 0
    for row in rows:
        tokens += len(row["input_ids"])
        scored += sum(1 for label in row["labels"] if label != -100)
    return {"tokens": tokens, "scored": scored}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _dpo_worker import _profiled
    from mfu import non_embedding_parameters

    torch.set_num_threads(args.threads)
    counter = StepCounter()
    rss_after_imports = rss_mib()
    started = time.perf_counter()
    build = build_alignkit if args.setting.startswith("alignkit") else build_trl
    trainer, model = build(args, counter)
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
        "dataset_tokens": dataset_tokens(trainer.train_dataset),
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
    parser.add_argument("--data", type=Path, required=True, help="JSONL prompt/completion")
    parser.add_argument("--tokens", type=Path, required=True, help="JSONL input_ids/labels")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8, help="examples per step, padded")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per step")
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
