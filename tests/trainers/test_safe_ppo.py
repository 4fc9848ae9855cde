"""Safe-PPO (PPO-Lagrangian) end to end on the synthetic assistant task, from the shared SFT
checkpoint, with the task's own judges: the reward is the helpfulness judge, the cost the
safety judge (`assistant_safety_cost`, > 0 unsafe), both as examples/safe_ppo.yaml sets them.

The main test runs the example's own setting (read from the YAML file; only the paths and the
number of iterations are overridden), so the example and the test cannot drift apart.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml
from metric_helpers import is_clock_metric

from alignkit.config import load_config
from alignkit.data.synthetic import safety_cost
from alignkit.errors import ConfigError
from alignkit.eval import evaluate_synthetic_task
from alignkit.rollout import SamplingConfig
from alignkit.tracking import latest_checkpoint, read_metrics
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig
from alignkit.trainers.safe_ppo import SafePPOConfig, SafePPOTrainer, build_safe_ppo_trainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "safe_ppo.yaml"
#: Plain PPO inside the same trainer: lambda held at exactly 0, so the policy's advantage is
#: (A_r - 0 * A_c) / (1 + 0) = A_r, PPO's own; the cost is still judged and logged.
PLAIN_PPO = ("lambda.rule=linear", "lambda.init=0", "lambda.min_value=0", "lambda.lr=0")
PLAIN_PPO += ("lambda.ema=0.95",)  # the linear rule has no EMA: the example's is set back
#: No held-out prompts: evaluation off, and the example's evaluation settings back to defaults.
NO_EVAL = ("data.eval_file=null", "eval.every=null", "data.max_eval_prompts=64")


def safe_ppo_config(sft_run, task_files, out: Path, name: str, *overrides: str) -> SafePPOConfig:
    """examples/safe_ppo.yaml with the session's SFT checkpoint and task files."""
    paths = (
        f"output_dir={out}",
        f"run_name={name}",
        f"model.name={sft_run.model_dir}",
        f"data.train_file={task_files['prompts_train']}",
        f"data.eval_file={task_files['prompts_heldout']}",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
    )
    method = get_method("safe-ppo")
    return load_config(SafePPOConfig, EXAMPLE, [*method.defaults, *paths, *overrides])


def train(cfg: SafePPOConfig) -> list[dict]:
    trainer = build_safe_ppo_trainer(cfg)
    trainer.train()
    return read_metrics(trainer.run_dir.metrics_path)


def series(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r and r["step"] > 0]


def last_mean(records: list[dict], key: str, n: int = 5) -> float:
    values = series(records, key)[-n:]
    return sum(values) / len(values)


def test_safe_ppo_holds_the_safety_judges_cost_below_the_limit_where_ppo_does_not(
    sft_run, task_files, tmp_path
):
    # The example's setting for 30 iterations, then plain PPO (lambda = 0) with the same seed.
    # Measured (seed 0; the same numbers as the example run): Safe-PPO's cost/mean -0.07 at
    # iteration 1, -0.55 over the last 5 (limit -0.4), violation rate 0.34 -> 0.06; lambda
    # 1 -> 2.20 at iteration 20, then down by at most 5% per iteration to 1.69. Plain PPO: cost
    # +0.02 over the last 5, violation rate 0.43, reward 0.84 (Safe-PPO 0.59). Greedy held-out
    # cost -0.24 before, -0.55 after Safe-PPO (no unsafe answer), +0.03 after PPO.
    safe = train(safe_ppo_config(sft_run, task_files, tmp_path, "safe", "train.iterations=30"))
    plain = train(
        safe_ppo_config(sft_run, task_files, tmp_path, "ppo", "train.iterations=30", *PLAIN_PPO)
    )
    cfg = safe_ppo_config(sft_run, task_files, tmp_path, "x")
    limit, init = cfg.cost_limit, cfg.lambda_.init
    costs, lambdas = series(safe, "cost/mean"), series(safe, "lambda")
    # The SFT policy violates the constraint: its first iterations' cost is above the limit.
    assert sum(costs[:5]) / 5 > limit + 0.15
    # Safe-PPO ends below the limit (mean of the last 5 iterations: one iteration's batch holds
    # 8 to 18 harmful prompts out of 32, so a single iteration's mean is noisy).
    assert last_mean(safe, "cost/mean") < limit - 0.05
    assert last_mean(safe, "cost/violation_rate") < 0.5 * series(safe, "cost/violation_rate")[0]
    # lambda rises while the constraint is violated: to at least 1.5 x its initial value, the
    # peak coming after the first 5 iterations (where it falls depends on round-off: a change
    # of 1e-6 in the old log-probs moved it from iteration 20 to 25 of 30) ...
    peak = lambdas.index(max(lambdas))
    assert max(lambdas) > 1.5 * init and peak >= 5
    # ... then settles: once the constraint holds it only comes down, by less than 10% per
    # iteration over the last 5 iterations (no oscillation, no runaway), and stays above init.
    after = lambdas[peak:]
    assert all(b <= a for a, b in pairwise(after))
    assert all(abs(b - a) < 0.1 * a for a, b in pairwise(lambdas[-6:]))
    assert lambdas[-1] > init
    # Plain PPO on the same reward, same seed: lambda stays 0 and the cost ends clearly higher
    # (PPO pushes harmful prompts towards compliance, which the helpfulness judge prefers).
    assert series(plain, "lambda") == [0.0] * len(lambdas)
    assert last_mean(plain, "cost/mean") > limit + 0.2
    assert last_mean(plain, "cost/mean") - last_mean(safe, "cost/mean") > 0.35
    # PPO keeps its helpfulness; Safe-PPO pays some on the harmful prompts it now refuses.
    assert last_mean(plain, "reward/mean") > 0.75
    assert last_mean(safe, "reward/mean") > 0.45
    # The greedy held-out evaluation agrees: Safe-PPO's final policy is safer than PPO's.
    final_safe, final_plain = safe[-1], plain[-1]
    assert final_safe["eval/cost"] < final_plain["eval/cost"] - 0.2
    assert final_safe["eval/violation_rate"] < final_plain["eval/violation_rate"]


def test_safe_ppo_with_lambda_held_at_zero_is_plain_ppo(sft_run, task_files, tmp_path):
    # The baseline above is PPO itself: the `ppo` trainer on the example minus its cost keys
    # logs the very same numbers as Safe-PPO with lambda = 0 (same seed, same samples).
    small = (
        "train.iterations=3",
        "rollout.prompts_per_iteration=8",
        "rollout.max_new_tokens=16",
        "train.sequences_per_device=16",
        *NO_EVAL,
    )
    safe = train(safe_ppo_config(sft_run, task_files, tmp_path, "lambda0", *small, *PLAIN_PPO))
    settings = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    for key in ("costs", "cost_limit", "lambda", "cost_critic"):
        del settings[key]
    ppo_yaml = tmp_path / "ppo.yaml"
    ppo_yaml.write_text(yaml.safe_dump(settings), encoding="utf-8")
    method = get_method("ppo")
    cfg = load_config(
        PGConfig,
        ppo_yaml,
        [
            *method.defaults,
            f"output_dir={tmp_path}",
            "run_name=ppo",
            f"model.name={sft_run.model_dir}",
            f"data.train_file={task_files['prompts_train']}",
            "logging.every=1",
            "logging.progress_bar=false",
            "logging.plots=false",
            *small,
        ],
    )
    trainer = build_pg_trainer(cfg, PolicyGradientTrainer)
    trainer.train()
    plain = read_metrics(trainer.run_dir.metrics_path)
    assert [r["step"] for r in plain] == [r["step"] for r in safe] == [1, 2, 3]
    for want, have in zip(plain, safe, strict=True):
        shared = [k for k in want if not is_clock_metric(k)]
        assert {"reward/mean", "actor/pg_loss", "critic/vf_loss", "kl/mean"} <= set(shared)
        assert {k: have[k] for k in shared} == {k: want[k] for k in shared}


def test_the_held_out_evaluation_judges_greedy_completions_with_both_sources(
    sft_run, task_files, tmp_path
):
    # Step 0 (before any update) evaluates the SFT policy: the same greedy completions as
    # alignkit.eval's task evaluation, judged by the helpfulness judge and the safety judge.
    cfg = safe_ppo_config(
        sft_run, task_files, tmp_path, "eval", "train.iterations=1", "data.max_eval_prompts=24"
    )
    trainer = build_safe_ppo_trainer(cfg)
    got = trainer.evaluate()
    rows = task_files["prompts_heldout"].read_text(encoding="utf-8").splitlines()[:24]
    prompts = [json.loads(row)["prompt"] for row in rows]
    assert len(trainer.eval_prompts) == 24
    want = evaluate_synthetic_task(
        trainer.unwrapped_model,
        trainer.tokenizer,
        prompts,
        SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0),
    )
    costs = [safety_cost(p, r) for p, r in zip(prompts, want.responses, strict=True)]
    assert got["eval/reward"] == pytest.approx(want.metrics["helpfulness"], abs=1e-6)
    assert got["eval/cost"] == pytest.approx(want.metrics["cost"], abs=1e-6)
    assert got["eval/violation_rate"] == pytest.approx(sum(c > 0 for c in costs) / 24)
    assert 0 < got["eval/violation_rate"] < 1  # the SFT policy answers some prompts unsafely


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(sft_run, task_files, tmp_path):
    # lambda, the cost critic and its optimizer are checkpointed and restored; 2 mini-batches.
    settings = (
        "train.iterations=6",
        "checkpoint.every=3",
        "rollout.prompts_per_iteration=8",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=24",
        "train.sequences_per_minibatch=16",
        "train.sequences_per_device=16",
        *NO_EVAL,
    )
    whole = train(safe_ppo_config(sft_run, task_files, tmp_path, "whole", *settings))

    class Killed(Exception):
        pass

    class DiesInIteration5(SafePPOTrainer):
        def optimize(self, minibatch):
            if self.state.step == 4:
                raise Killed
            return super().optimize(minibatch)

    cfg = safe_ppo_config(sft_run, task_files, tmp_path, "cut", *settings)
    built = build_safe_ppo_trainer(cfg)
    dying = DiesInIteration5(
        cfg, built.unwrapped_model, built.tokenizer, built.prompts, built.reward,
        critic=built.critic, cost=built.cost, cost_critic=built.cost_critic,
    )  # fmt: skip
    with pytest.raises(Killed):
        dying.train()
    cut = tmp_path / "cut"
    assert latest_checkpoint(cut).name == "step-3"
    torch.manual_seed(99)  # the resumed process starts with another global RNG state
    train(
        safe_ppo_config(sft_run, task_files, tmp_path, "ignored", *settings, f"resume_from={cut}")
    )
    got = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]
    assert len({r["lambda"] for r in whole}) == 6  # lambda moves every iteration
    for want, have in zip(whole, got, strict=True):
        assert "critic_cost/vf_loss" in want and "lambda" in want
        for key, value in want.items():
            if not is_clock_metric(key):
                assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (want["step"], key)


def test_config_needs_a_cost_source_and_a_matching_critic(sft_run, task_files, tmp_path):
    with pytest.raises(ConfigError, match="costs: give at least one source"):
        build_safe_ppo_trainer(safe_ppo_config(sft_run, task_files, tmp_path, "x", "costs=[]"))
    with pytest.raises(ConfigError, match=r"cost_critic is set but advantage\.estimator=grpo"):
        safe_ppo_config(
            sft_run, task_files, tmp_path, "x", "advantage.estimator=grpo", "critic=null",
            "cost_critic.lr=1e-3",
        )  # fmt: skip


def test_a_cost_model_is_a_cost_source_and_a_reward_model_is_refused(sft_run, task_files, tmp_path):
    from alignkit.models import load_reward_model

    for kind in ("reward", "cost"):
        model, tokenizer = load_reward_model("tiny", kind=kind, seed=3)
        model.save_pretrained(tmp_path / kind, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=r"costs: reward_model:.* is a reward model"):
        build_safe_ppo_trainer(
            safe_ppo_config(
                sft_run, task_files, tmp_path, "rm", f"costs=[{{model: {tmp_path}/reward}}]"
            )
        )
    cfg = safe_ppo_config(
        sft_run, task_files, tmp_path, "cm", f"costs=[{{model: {tmp_path}/cost}}]"
    )
    trainer = build_safe_ppo_trainer(cfg)
    costs = trainer.cost(
        ["How do I bake bread?"] * 2, ["Mix flour.", "Sure, here is how"], [{}, {}]
    )
    assert costs.shape == (2,) and torch.isfinite(costs).all() and costs[0] != costs[1]
