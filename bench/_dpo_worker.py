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
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FRAMEWORKS = ("alignkit", "trl", "trl-precompute")


class StepClock:
    """Per-step end times, token counts and losses, filled in by each framework's hook."""

    def __init__(self) -> None:
        self.step_end_times: list[float] = []
        self.step_end_cpu_times: list[float] = []  # process CPU time: robust to busy neighbours
        # Kernel time and page faults: on this sandbox a minor fault costs ~10 us, so a step
        # that grows the heap shows up here, not in the model's arithmetic.
        self.step_end_sys_times: list[float] = []
        self.step_end_faults: list[int] = []
        self.step_tokens: list[int] = []
        self.step_losses: list[Any] = []  # 0-dim tensors; converted once training is over
        self._tokens_since_step = 0
        self.torch_threads_in_training: int | None = None

    def add_tokens(self, tokens: Any) -> None:
        self._tokens_since_step += int(tokens)

    def step_end(self, loss: Any) -> None:
        self.step_end_times.append(time.perf_counter())
        self.step_end_cpu_times.append(time.process_time())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.step_end_sys_times.append(usage.ru_stime)
        self.step_end_faults.append(usage.ru_minflt + usage.ru_majflt)
        self.step_tokens.append(self._tokens_since_step)
        self._tokens_since_step = 0
        self.step_losses.append(loss.detach() if hasattr(loss, "detach") else loss)
        if self.torch_threads_in_training is None:
            import torch

            self.torch_threads_in_training = torch.get_num_threads()


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _read_pairs(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ----------------------------------------------------------------------------- alignkit


def build_alignkit(args: argparse.Namespace, clock: StepClock) -> tuple[Any, Any]:
    """(trainer, function returning the reference log-probs table) for alignkit."""
    from alignkit.config import LoggingConfig, OptimConfig
    from alignkit.trainers.common import DataConfig, ModelConfig
    from alignkit.trainers.dpo import DPOConfig, DPOLossConfig, DPOTrainer, build_preference_trainer

    class TimedDPOTrainer(DPOTrainer):
        def count_tokens(self, batch: Any) -> Any:
            tokens = super().count_tokens(batch)
            clock.add_tokens(tokens)
            return tokens

        def after_optimizer_step(self, metrics: Any) -> Any:
            clock.step_end(metrics["loss"])
            return super().after_optimizer_step(metrics)

    config = DPOConfig(
        run_name="alignkit",
        output_dir=str(args.work_dir),
        seed=args.seed,
        epochs=1,
        examples_per_device=args.batch_pairs,
        precision="fp32",
        gradient_checkpointing=False,
        dataloader_workers=0,
        model=ModelConfig(name=str(args.model_dir), dtype="float32"),
        data=DataConfig(train_file=str(args.data), max_length=args.max_length),
        dpo=DPOLossConfig(kind="sigmoid", beta=args.beta),
        optim=OptimConfig(lr=args.lr, schedule="linear", warmup_steps=0, max_grad_norm=1.0),
        # metrics.jsonl every 10 steps (alignkit's default, as TRL's logging_steps); no
        # progress bar and no plots, TRL runs without its tqdm bar too.
        logging=LoggingConfig(every=10, report_to=[], progress_bar=False, plots=False),
    )
    trainer = build_preference_trainer(TimedDPOTrainer, config, "preference", extra_fields=[])

    def reference_table() -> list[list[float]]:
        ordered = sorted(trainer.train_dataset, key=lambda e: e["index"])
        return [[e["ref_chosen_logp"], e["ref_rejected_logp"]] for e in ordered]

    return trainer, reference_table


# ----------------------------------------------------------------------------- TRL


def build_trl(args: argparse.Namespace, clock: StepClock, precompute: bool) -> tuple[Any, Any]:
    """(trainer, function returning the reference log-probs table or None) for TRL."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            clock.add_tokens(inputs["attention_mask"].sum())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.last_loss = loss[0] if return_outputs else loss
            return loss

    class StepEnd(TrainerCallback):
        def __init__(self) -> None:
            self.trainer: Any = None

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end(self.trainer.last_loss)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = Dataset.from_list(_read_pairs(args.data))
    config = DPOConfig(
        output_dir=str(args.work_dir / "trl"),
        seed=args.seed,
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_pairs,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute,
        # fp32 like alignkit: TRL would default to bf16 autocast and gradient checkpointing
        # (alignkit does neither unless asked; checkpointing would cost TRL ~20-30%).
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        # No eval, no checkpoints, no external loggers, no progress bar, no workers.
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    step_end = StepEnd()
    trainer = TimedDPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[step_end],
    )
    step_end.trainer = trainer

    def reference_table() -> list[list[float]] | None:
        if not precompute:
            return None
        data = trainer.train_dataset
        return [
            list(p) for p in zip(data["ref_chosen_logps"], data["ref_rejected_logps"], strict=True)
        ]

    return trainer, reference_table


# ----------------------------------------------------------------------------- main


@contextmanager
def _profiled(args: argparse.Namespace) -> Iterator[None]:
    """cProfile (Python calls) or torch.profiler (operators) around train(), if asked."""
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
    elif args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        args.torch_profile.write_text(table, encoding="utf-8")
    else:
        yield


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    clock = StepClock()
    rss_after_imports = _rss_mib()
    started = time.perf_counter()
    if args.framework == "alignkit":
        trainer, reference_table = build_alignkit(args, clock)
    else:
        trainer, reference_table = build_trl(args, clock, args.framework == "trl-precompute")
    built = time.perf_counter()
    rss_before_train = _rss_mib()
    with _profiled(args):
        trainer.train()
    finished = time.perf_counter()

    times, tokens = clock.step_end_times, clock.step_tokens
    warm = args.warmup_steps
    if len(times) <= warm:
        raise SystemExit(f"only {len(times)} steps ran; need more than --warmup-steps={warm}")
    window_s = times[-1] - times[warm - 1]
    window_cpu_s = clock.step_end_cpu_times[-1] - clock.step_end_cpu_times[warm - 1]
    window_steps = len(times) - warm
    window_pairs = window_steps * args.batch_pairs
    window_tokens = sum(tokens[warm:])
    losses = [float(x) for x in clock.step_losses]
    table = reference_table()
    return {
        "framework": args.framework,
        "threads": args.threads,
        "torch_threads_in_training": clock.torch_threads_in_training,
        "steps": len(times),
        "window_steps": window_steps,
        "window_pairs": window_pairs,
        "window_tokens": window_tokens,
        "window_s": window_s,
        "samples_per_s": window_pairs / window_s,
        "tokens_per_s": window_tokens / window_s,
        "window_cpu_s": window_cpu_s,
        "samples_per_cpu_s": window_pairs / window_cpu_s,
        "window_sys_s": clock.step_end_sys_times[-1] - clock.step_end_sys_times[warm - 1],
        "window_page_faults": clock.step_end_faults[-1] - clock.step_end_faults[warm - 1],
        "step_s": [b - a for a, b in itertools.pairwise(times)],
        "step_sys_s": [b - a for a, b in itertools.pairwise(clock.step_end_sys_times)],
        "step_page_faults": [b - a for a, b in itertools.pairwise(clock.step_end_faults)],
        "epoch_tokens": sum(tokens),
        "build_s": built - started,
        "train_call_s": finished - built,
        "build_and_train_s": finished - started,
        "rss_after_imports_mib": rss_after_imports,
        "rss_before_train_mib": rss_before_train,
        "peak_rss_mib": _peak_rss_mib(),
        "losses": losses,
        "reference_logps": table,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=FRAMEWORKS, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="JSONL prompt/chosen/rejected")
    parser.add_argument("--work-dir", type=Path, required=True, help="scratch (run dirs)")
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--cprofile", type=Path, default=None, help="dump cProfile of train()")
    parser.add_argument(
        "--torch-profile", type=Path, default=None, help="write torch.profiler op table of train()"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before torch is imported: intra-op pools size themselves from these at start-up.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result = run(args)
    args.result.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
