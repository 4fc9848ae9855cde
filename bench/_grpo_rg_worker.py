"""One GRPO run on a reasoning-gym task (alignkit or TRL) in its own process; see
bench/grpo_reasoning_gym.py.

The job of examples/grpo_reasoning_gym.yaml in both frameworks: SmolLM2-135M-Instruct (fp32
weights; ``--precision bf16``: bf16 autocast over them, TRL ``bf16=True``) with a LoRA adapter (r 16, alpha 32, dropout 0, every linear layer), chain_sum prompts
(conversational), 8 prompts x 4 completions per optimizer step (one step per generation batch),
at most 64 new tokens at T = 0.7, group-normalised advantages, token-mean loss over the step
(TRL ``dapo``), clip 0.2, no KL (TRL ``beta=0``), AdamW lr 1e-4 constant, grad clip 1.0, dropout
off, no gradient checkpointing. The reward is the same function for both: alignkit's
``math_accuracy`` (math-verify) on the completion's text. Both are judged the same way after
training: greedy answers of the held-out prompts by alignkit's engine, scored by that reward.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from _frameworks import alignkit_online_overrides, trl_online_args
from _harness import run_setting, worker_main, worker_parser

PROMPTS_PER_STEP, GENERATIONS, TEMPERATURE = 8, 4, 0.7
MICRO_BATCH = 8  # sequences per forward pass; the 32 of a step are 4 micro-batches in both
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
_MATH: Any = None


def accuracy(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> list:
    """alignkit's math_accuracy on the completions' text (TRL passes message lists)."""
    global _MATH
    if _MATH is None:
        from alignkit.rollout.rewards import resolve_reward_function

        _MATH = resolve_reward_function("math_accuracy")
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return _MATH(prompts=prompts, completions=texts, answer=answer)


def held_out_accuracy(model: Any, tokenizer: Any, path: Path) -> float:
    """Greedy answers of the held-out prompts (alignkit's engine), mean reward."""
    from alignkit.rollout import SamplingConfig, generate_responses

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    greedy = SamplingConfig(max_new_tokens=64, temperature=0.0)
    texts = generate_responses(model, tokenizer, [r["prompt"] for r in rows], greedy)
    scores = accuracy([], texts, [r["answer"] for r in rows])
    return sum(s or 0.0 for s in scores) / len(scores)


def run_alignkit(args: argparse.Namespace) -> dict:
    from alignkit.config import load_config
    from alignkit.tracking import read_metrics
    from alignkit.trainers.pg import build_pg_trainer
    from alignkit.trainers.rl_config import PGConfig

    cfg = load_config(
        PGConfig,
        None,
        [
            *alignkit_online_overrides(args),
            f"model.lora={{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}}}",
            f"data.eval_file={args.eval_prompts}",
            "data.max_prompt_length=128",
            "data.max_eval_prompts=null",
            f"rewards=[{{function: {Path(__file__).resolve()}:accuracy}}]",
            f"rollout.prompts_per_iteration={PROMPTS_PER_STEP}",
            f"rollout.samples_per_prompt={GENERATIONS}",
            f"rollout.temperature={TEMPERATURE}",
            f"train.sequences_per_device={MICRO_BATCH}",
            "kl.coef=0",
            "optim.max_grad_norm=1.0",
        ],
    )
    trainer = build_pg_trainer(cfg)
    cpu_ends: list[float] = []  # process CPU seconds at each iteration's end
    after_iteration = trainer.after_iteration

    def clocked_after_iteration(metrics: Any) -> Any:
        cpu_ends.append(time.process_time())
        return after_iteration(metrics)

    trainer.after_iteration = clocked_after_iteration
    started = time.perf_counter()
    summary = trainer.train()
    train_call = time.perf_counter() - started
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if "reward/mean" in r]
    return {
        "step_s": [r["timing/iteration"] for r in records],
        "step_cpu_s": [b - a for a, b in itertools.pairwise(cpu_ends)],
        "generation_s": [r["timing/rollout"] for r in records],
        "scoring_s": [r["timing/reward"] for r in records],
        "experience_s": [r["timing/iteration"] - r["timing/update"] for r in records],
        "update_s": [r["timing/update"] for r in records],
        "precision": summary.get("precision"),
        "rewards": [r["reward/mean"] for r in records],
        "completion_tokens": [r["response_length/mean"] for r in records],
        "held_out_before": summary["initial_eval"]["eval/reward"],
        "held_out_after": summary["eval"]["eval/reward"],
        "train_call_s": train_call,
    }


def run_trl(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32")  # master weights
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    config = GRPOConfig(
        **{
            **trl_online_args(args),
            "temperature": TEMPERATURE,
            "gradient_accumulation_steps": PROMPTS_PER_STEP * GENERATIONS // MICRO_BATCH,
        },
        per_device_train_batch_size=MICRO_BATCH,
        num_iterations=1,
        num_generations=GENERATIONS,
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
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    times: list[float] = []
    cpu_ends: list[float] = []  # process CPU seconds at each step's end
    # Seconds per step in TRL's generation (_generate), reward functions (_calculate_rewards) and
    # the whole experience (_generate_and_score_completions: both, plus old log-probs and
    # advantages); the update is the rest of the step.
    stages = {"generation": [], "scoring": [], "experience": []}
    running = dict.fromkeys(stages, 0.0)

    def clocked(stage: str, method: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                running[stage] += time.perf_counter() - started

        return run

    class TimedGRPOTrainer(GRPOTrainer):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self._generate = clocked("generation", self._generate)
            self._calculate_rewards = clocked("scoring", self._calculate_rewards)
            self._generate_and_score_completions = clocked(
                "experience", self._generate_and_score_completions
            )

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            running.update(dict.fromkeys(running, 0.0))
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)
            cpu_ends.append(time.process_time())
            for stage, seconds in running.items():
                stages[stage].append(seconds)

    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=[accuracy],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepTimer()],
    )
    started = time.perf_counter()
    trainer.train()
    train_call = time.perf_counter() - started
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "step_s": times,
        "step_cpu_s": [b - a for a, b in itertools.pairwise(cpu_ends)],
        "generation_s": stages["generation"],
        "scoring_s": stages["scoring"],
        "experience_s": stages["experience"],
        "update_s": [t - e for t, e in zip(times, stages["experience"], strict=True)],
        "precision": args.precision,
        "rewards": [h["reward"] for h in logs],
        "completion_tokens": [h["completions/mean_length"] for h in logs],
        "held_out_after": held_out_accuracy(trainer.model, tokenizer, args.eval_prompts),
        "train_call_s": train_call,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_setting(args, {"alignkit": run_alignkit, "trl": run_trl})


def parser() -> argparse.ArgumentParser:
    out = worker_parser(
        __doc__.splitlines()[0], ("alignkit", "trl"), setting_option="framework", online=True
    )
    out.add_argument("--eval-prompts", type=Path, required=True)
    return out


if __name__ == "__main__":
    sys.exit(worker_main(parser(), run))
