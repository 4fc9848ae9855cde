"""One PPO training run (alignkit or TRL) in its own process; see bench/ppo_tiny.py.

Both frameworks run the same job: the saved tiny policy, the same prompt token ids, one
completion per prompt, ``--rollout`` prompts per rollout, the same max new tokens, sampling at
T = 1 with no top-k/top-p and EOS ending a completion, the same reward model weights (scoring
the whole sequence), a critic initialised from that reward model, k1 KL to the initial policy in
the reward (coef ``--kl-coef``), GAE (gamma 1, lambda 0.95), advantages whitened over the
rollout's response tokens, one PPO epoch of ``--minibatches`` optimizer steps, PPO clip 0.2,
value clip 0.2, AdamW at a constant learning rate for policy and critic, no gradient clipping
(TRL's PPO loop never clips), fp32, dropout off, no gradient checkpointing.

Step times are taken the same way in both: the wall and CPU clocks at the end of every whole
step (rollout, scoring, update, logging), differenced; the first step starts when ``train()`` is
entered (TRL: ``on_train_begin``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _frameworks import alignkit_online_overrides, trl_online_args
from _harness import run_setting, worker_main, worker_parser


class StepClock:
    """Wall and CPU clocks at step ends, and the time spent inside ``gc.collect``.

    ``gc.collect`` is wrapped for the whole process (TRL's PPO loop calls it twice per step;
    alignkit never does), so each step's share of full garbage collections is known.
    """

    def __init__(self) -> None:
        self.gc_wall = self.gc_cpu = 0.0
        self.marks: list[tuple[float, float, float, float]] = []
        collect = gc.collect

        def timed_collect(*a: Any, **k: Any) -> int:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return collect(*a, **k)
            finally:
                self.gc_wall += time.perf_counter() - wall
                self.gc_cpu += time.process_time() - cpu

        gc.collect = timed_collect
        self.start()

    def start(self) -> None:
        """The start of step 1 (forgets earlier marks)."""
        self.marks = []
        self.mark()

    def mark(self) -> None:
        """The end of a step."""
        self.marks.append((time.perf_counter(), time.process_time(), self.gc_wall, self.gc_cpu))

    def per_step(self) -> dict[str, list[float]]:
        """Per step: wall s, CPU s, and the wall and CPU s inside gc.collect."""
        names = ("step_s", "step_cpu_s", "gc_s", "gc_cpu_s")
        pairs = list(itertools.pairwise(self.marks))
        return {name: [b[i] - a[i] for a, b in pairs] for i, name in enumerate(names)}


def run_alignkit(args: argparse.Namespace) -> dict[str, Any]:
    from alignkit.config import load_config
    from alignkit.tracking import read_metrics
    from alignkit.trainers.pg import build_pg_trainer
    from alignkit.trainers.rl_config import PGConfig

    minibatch = args.rollout // args.minibatches
    cfg = load_config(
        PGConfig,
        None,
        [
            *alignkit_online_overrides(args),
            f"rewards=[{{model: {args.reward_dir}}}]",
            f"rollout.prompts_per_iteration={args.rollout}",
            "rollout.samples_per_prompt=1",
            "rollout.temperature=1.0",
            "train.epochs_per_iteration=1",
            f"train.sequences_per_minibatch={minibatch}",
            f"train.sequences_per_device={minibatch}",
            "advantage.estimator=gae",
            "advantage.gamma=1.0",
            "advantage.lam=0.95",
            "advantage.whiten=true",
            f"kl.coef={args.kl_coef}",
            "kl.placement=reward",
            "kl.estimator=k1",
            "policy_loss.name=ppo_clip",
            "policy_loss.clip_ratio=0.2",
            "policy_loss.agg=token-mean",
            f"critic.model={args.reward_dir}",
            f"critic.lr={args.lr}",
            "critic.value_clip=0.2",
            "critic.coef=0.1",
            "optim.max_grad_norm=null",
        ],
    )
    trainer = build_pg_trainer(cfg)
    original_end_step = trainer.end_step
    clock = StepClock()

    def end_step(*a: Any, **k: Any) -> Any:
        stop = original_end_step(*a, **k)
        clock.mark()
        return stop

    trainer.end_step = end_step  # the step ends after alignkit's own logging, as TRL's does
    clock.start()
    trainer.train()
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if "reward/mean" in r]
    split = {
        key.removeprefix("timing/"): [r.get(key, 0.0) for r in records]
        for key in sorted({k for r in records for k in r if k.startswith("timing/")})
    }
    return {
        **clock.per_step(),
        "split_s": split,
        "completion_tokens": [r["response_length/mean"] * args.rollout for r in records],
        "scores": [r["reward/mean"] for r in records],
        "kl_mean": [r.get("kl/mean") for r in records],
        "explained_variance": [r.get("critic/vf_explained_var") for r in records],
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"  # TRL's PPO reads the response as the columns after the prompt
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(
        args.reward_hf_dir, dtype=torch.float32
    )
    value = AutoModelForSequenceClassification.from_pretrained(
        args.reward_hf_dir, dtype=torch.float32
    )
    config = PPOConfig(
        **trl_online_args(args),
        per_device_train_batch_size=args.rollout,
        num_mini_batches=args.minibatches,
        num_ppo_epochs=1,
        total_episodes=args.rollout * args.steps,
        local_rollout_forward_batch_size=args.rollout,
        response_length=args.max_new_tokens,
        stop_token="eos",
        missing_eos_penalty=None,
        kl_coef=args.kl_coef,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        weight_decay=0.0,
        num_sample_generations=0,
        sft_model_path=str(args.model_dir),
        reward_model_path=str(args.reward_hf_dir),
    )
    clock = StepClock()
    tokens: list[int] = []
    eos = tokenizer.eos_token_id
    generate = trl_ppo.batch_generation

    def counted_generation(model, queries, *a, **k):
        query_responses, logits = generate(model, queries, *a, **k)
        responses = query_responses[:, queries.shape[1] :]
        is_eos = responses == eos
        # Tokens up to and including the first EOS (all of them if none): alignkit's count.
        first_eos = is_eos.int().argmax(1) + 1
        tokens.append(int(torch.where(is_eos.any(1), first_eos, responses.shape[1]).sum()))
        return query_responses, logits

    trl_ppo.batch_generation = counted_generation

    class Clock(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            clock.start()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.mark()

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        callbacks=[Clock()],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    # A step's collections run between its start and its end mark: TRL collects after
    # generation and again after on_step_end, which falls in the next step's window.
    return {
        **clock.per_step(),
        "completion_tokens": tokens,
        "scores": [h["objective/scores"] for h in logs],
        "kl_sum_per_sequence": [h["objective/kl"] for h in logs],
        "trl_version": __import__("trl").__version__,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_setting(args, {"alignkit": run_alignkit, "trl": run_trl})


def parser() -> argparse.ArgumentParser:
    out = worker_parser(
        __doc__.splitlines()[0], ("alignkit", "trl"), setting_option="framework", online=True
    )
    out.add_argument("--reward-dir", type=Path, required=True)
    out.add_argument("--reward-hf-dir", type=Path, required=True)
    out.add_argument("--rollout", type=int, default=16)
    out.add_argument("--minibatches", type=int, default=2)
    out.add_argument("--kl-coef", type=float, default=0.05)
    return out


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    sys.exit(worker_main(parser(), run))
