"""How the workers set up each framework alike: the settings every run of a framework shares,
matched between alignkit and TRL, and the hooks that feed the harness's per-step clock
(:class:`_harness.StepCounter`) from each framework's trainer.

Offline (DPO, SFT, reward models): :func:`alignkit_offline_args` and :func:`trl_offline_args`,
:func:`count_alignkit_steps` and :func:`timed_trl_trainer`. Online (GRPO, PPO):
:func:`alignkit_online_overrides` and :func:`trl_online_args`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from _harness import StepCounter


def alignkit_offline_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields every offline alignkit run shares, matching :func:`trl_offline_args`:
    the worker's model, seed, learning rate and precision (fp32 weights), one epoch, a linear schedule without
    warm-up, clipping at 1.0, no checkpointing or loader workers, metrics every 10 steps, no
    progress bar and no plots (TRL runs without its tqdm bar too)."""
    from alignkit.config import LoggingConfig, OptimConfig
    from alignkit.trainers.common import ModelConfig

    return {
        "run_name": "alignkit",
        "output_dir": str(args.work_dir),
        "seed": args.seed,
        "epochs": 1,
        "precision": args.precision,
        "gradient_checkpointing": False,
        "dataloader_workers": 0,
        "model": ModelConfig(name=str(args.model_dir), dtype="float32"),
        "optim": OptimConfig(lr=args.lr, schedule="linear", warmup_steps=0, max_grad_norm=1.0),
        "logging": LoggingConfig(every=10, report_to=[], progress_bar=False, plots=False),
    }


def trl_offline_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainingArguments every offline TRL run shares, matching
    :func:`alignkit_offline_args`: the worker's precision like alignkit (bf16 autocast over fp32
    weights, or none), gradient checkpointing off as in alignkit unless asked (it would cost TRL
    20-30%), one epoch on the CPU with a linear schedule and clipping at 1.0, no evaluation,
    checkpoints, external loggers, progress bar or loader workers, metrics every 10 steps."""
    return {
        "output_dir": str(args.work_dir / "trl"),
        "seed": args.seed,
        "learning_rate": args.lr,
        "num_train_epochs": 1,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "bf16": args.precision == "bf16",
        "fp16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 10,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
    }


def alignkit_online_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides every online (GRPO, PPO) alignkit run shares, matching
    :func:`trl_online_args`: the worker's model, prompts, seed, steps, completion length,
    precision and learning rate (constant), no sample generations, metrics every step, no progress bar or
    plots."""
    return [
        f"output_dir={args.work_dir}",
        "run_name=alignkit",
        f"seed={args.seed}",
        f"model.name={args.model_dir}",
        f"data.train_file={args.prompts}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"train.iterations={args.steps}",
        f"train.samples_every={args.steps + 1}",
        f"optim.lr={args.lr}",
        "optim.schedule=constant",
        f"precision={args.precision}",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
    ]


def trl_online_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainingArguments every online TRL run shares: the worker's precision on the CPU
    (``bf16=True``: accelerate's bf16 autocast over the fp32 weights), sampling at T = 1,
    AdamW at a constant learning rate, one rollout per optimizer step, no checkpointing,
    checkpoints, loggers, progress bar or loader workers, metrics every step."""
    return {
        "output_dir": str(args.work_dir),
        "seed": args.seed,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "optim": "adamw_torch",
        "gradient_accumulation_steps": 1,
        "temperature": 1.0,
        "bf16": args.precision == "bf16",
        "use_cpu": True,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "disable_tqdm": True,
    }


def timed_trl_trainer(
    trainer_class: type, counter: StepCounter, count: Callable[[Any], tuple], **kwargs: Any
) -> Any:
    """``trainer_class(**kwargs)`` (a TRL trainer) feeding ``counter``: each ``compute_loss``
    counts ``count(inputs)`` (examples, tokens[, scored]), each step's end (a callback) records
    the step's last loss."""
    from transformers import TrainerCallback

    class Timed(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counter.count(*count(inputs))
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.last_loss = loss[0] if return_outputs else loss
            return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **_: Any) -> None:
            counter.step_end(trainer.last_loss)

    trainer = Timed(callbacks=[StepEnd()], **kwargs)
    return trainer


def count_alignkit_steps(
    trainer: Any, counter: StepCounter, count: Callable[[Any, Any], tuple]
) -> None:
    """Feed ``counter`` from an alignkit trainer's own hooks, wrapped on the instance: after
    each ``count_tokens(batch)`` it counts ``count(batch, tokens)`` (examples, tokens[, scored];
    ``tokens``: what the trainer counted), after each optimizer step it ends a step."""
    count_tokens, after_step = trainer.count_tokens, trainer.after_optimizer_step

    def counted(batch: Any) -> Any:
        tokens = count_tokens(batch)
        counter.count(*count(batch, tokens))
        return tokens

    def stepped(metrics: Any) -> Any:
        counter.step_end(metrics["loss"])
        return after_step(metrics)

    trainer.count_tokens, trainer.after_optimizer_step = counted, stepped
