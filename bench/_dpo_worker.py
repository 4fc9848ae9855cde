"""One timed DPO training run, alignkit or TRL, in its own process (started by compare_trl.py).

Both frameworks train the same saved model on the same JSONL pairs with the same settings; a
per-step hook records when each optimizer step ends, how many non-pad tokens (attention mask
of the chosen + rejected rows) it processed and its loss. The throughput window runs from the
end of step ``--warmup-steps`` to the end of the last step, so model loading, tokenisation,
the reference pass, the first (slow) steps and the end-of-training work are outside it.

Only the framework being measured is imported, so peak RSS is the framework's own.

Usage (normally through compare_trl.py)::

    python bench/_dpo_worker.py --framework alignkit --model-dir M --data pairs.jsonl \\
        --work-dir W --result out.json [--cprofile out.prof]
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

FRAMEWORKS = ("alignkit", "trl", "trl-precompute")


def _read_pairs(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ----------------------------------------------------------------------------- alignkit


def build_alignkit(args: argparse.Namespace, counter: StepCounter) -> tuple[Any, Any]:
    """(trainer, function returning the reference log-probs table) for alignkit."""
    from alignkit.trainers.common import DataConfig
    from alignkit.trainers.dpo import DPOConfig, DPOLossConfig, DPOTrainer, build_preference_trainer

    config = DPOConfig(
        **alignkit_offline_args(args),
        examples_per_device=args.batch_pairs,
        data=DataConfig(train_file=str(args.data), max_length=args.max_length),
        dpo=DPOLossConfig(kind="sigmoid", beta=args.beta),
    )
    trainer = build_preference_trainer(DPOTrainer, config, "preference", extra_fields=[])
    count_alignkit_steps(trainer, counter, lambda batch, tokens: (0, tokens))

    def reference_table() -> list[list[float]]:
        ordered = sorted(trainer.train_dataset, key=lambda e: e["index"])
        return [[e["ref_chosen_logp"], e["ref_rejected_logp"]] for e in ordered]

    return trainer, reference_table


# ----------------------------------------------------------------------------- TRL


def build_trl(args: argparse.Namespace, counter: StepCounter, precompute: bool) -> tuple[Any, Any]:
    """(trainer, function returning the reference log-probs table or None) for TRL."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = Dataset.from_list(_read_pairs(args.data))
    config = DPOConfig(
        per_device_train_batch_size=args.batch_pairs,
        max_length=args.max_length,
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute,
        **trl_offline_args(args),
    )
    trainer = timed_trl_trainer(
        DPOTrainer,
        counter,
        lambda inputs: (0, inputs["attention_mask"].sum()),
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )

    def reference_table() -> list[list[float]] | None:
        if not precompute:
            return None
        data = trainer.train_dataset
        return [
            list(p) for p in zip(data["ref_chosen_logps"], data["ref_rejected_logps"], strict=True)
        ]

    return trainer, reference_table


# ----------------------------------------------------------------------------- main


#: The fields of the harness's window result that the DPO results (and their JSON) carry.
KEPT_FROM_WINDOW = ("torch_threads_in_training", "steps", "window_steps", "window_tokens",
                    "window_s", "tokens_per_s", "window_cpu_s", "window_sys_s",
                    "window_page_faults", "losses")  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    counter = StepCounter()
    if args.setting == "alignkit":
        build = functools.partial(build_alignkit, args, counter)
    else:
        build = functools.partial(build_trl, args, counter, args.setting == "trl-precompute")
    (_, reference_table), measures = timed_training(args, build)
    window = window_result(counter, args.warmup_steps)
    pairs = window["window_steps"] * args.batch_pairs  # every step holds --batch-pairs pairs
    return {
        **measures,
        **{key: window[key] for key in KEPT_FROM_WINDOW},
        "window_pairs": pairs,
        "samples_per_s": pairs / window["window_s"],
        "samples_per_cpu_s": pairs / window["window_cpu_s"],
        **counter.per_step(),
        "epoch_tokens": window["run_totals"]["tokens"],
        "reference_logps": reference_table(),
    }


def parser() -> argparse.ArgumentParser:
    out = worker_parser(__doc__.splitlines()[0], FRAMEWORKS, setting_option="framework")
    out.add_argument("--data", type=Path, required=True, help="JSONL prompt/chosen/rejected")
    out.add_argument("--beta", type=float, default=0.1)
    out.add_argument("--batch-pairs", type=int, default=8)
    out.add_argument("--max-length", type=int, default=128)
    return out


if __name__ == "__main__":
    sys.exit(worker_main(parser(), run))
