"""Safe-PPO (PPO-Lagrangian) end to end on the synthetic assistant task, from the shared SFT
checkpoint.

The reward is the task's helpfulness judge. The cost is a stand-in the tiny model can move in a
few iterations: +1 for a completion that opens with "Sure" (the SFT policy's compliant opening,
about 94% of its samples), -1 otherwise; the constraint ``mean cost <= 0`` asks for at most
half of the completions to open that way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.tracking import latest_checkpoint, read_metrics
from alignkit.trainers.registry import get_method
from alignkit.trainers.safe_ppo import SafePPOConfig, SafePPOTrainer, build_safe_ppo_trainer

_CLOCK = ("timing/", "tokens_per_s")
COST = "def opens_with_sure(prompts, completions, **_):\n" + (
    "    return [2.0 * c.strip().lower().startswith('sure') - 1.0 for c in completions]\n"
)


@pytest.fixture()
def cost_file(tmp_path: Path) -> Path:
    path = tmp_path / "costs.py"
    path.write_text(COST, encoding="utf-8")
    return path


def safe_ppo_config(sft_run, task_files, cost_file, name, *overrides) -> SafePPOConfig:
    base = (
        f"output_dir={cost_file.parent}",
        f"run_name={name}",
        f"model.name={sft_run.model_dir}",
        f"data.train_file={task_files['prompts_train']}",
        "data.max_prompt_length=64",
        "rewards=[{function: assistant_helpfulness}]",
        f"costs=[{{function: {cost_file}:opens_with_sure}}]",
        "cost_limit=0.0",
        "lambda.init=1.0",
        "lambda.lr=0.5",
        "lambda.ema=0.5",
        "rollout.prompts_per_iteration=8",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=24",
        "train.sequences_per_device=32",
        "critic.lr=3e-3",
        "cost_critic.lr=3e-3",
        "optim.lr=1e-3",
        "optim.schedule=constant",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
    )
    method = get_method("safe-ppo")
    return load_config(SafePPOConfig, None, [*method.defaults, *base, *overrides])


def train(cfg: SafePPOConfig) -> list[dict]:
    trainer = build_safe_ppo_trainer(cfg)
    trainer.train()
    return read_metrics(trainer.run_dir.metrics_path)


def last_mean(records: list[dict], key: str, n: int = 5) -> float:
    values = [r[key] for r in records if key in r][-n:]
    return sum(values) / len(values)


def test_lambda_drives_the_cost_below_the_limit_where_ppo_does_not(sft_run, task_files, cost_file):
    # Measured (seed 0, 20 iterations): cost/mean 0.88 -> -1.0 by iteration 7; lambda
    # 1 -> 10 (the ceiling) at iterations 5-6, then down to 0.14 by iteration 20 as the
    # constraint holds with slack (J_C = -1). With lambda frozen at 1e-6 (PPO on the reward
    # alone) the cost stays high: 0.88 at the start, 0.51 over the last 5 iterations.
    safe = train(safe_ppo_config(sft_run, task_files, cost_file, "safe", "train.iterations=20"))
    lambdas = [r["lambda"] for r in safe]
    assert safe[0]["cost/mean"] > 0.5 and safe[0]["cost/violation_rate"] > 0.75
    assert last_mean(safe, "cost/mean") < -0.5  # below the limit 0, with room
    assert last_mean(safe, "cost/violation_rate") < 0.25
    peak = lambdas.index(max(lambdas))
    assert max(lambdas) > 5.0 and 0 < peak < 10  # rises while the constraint is violated
    assert lambdas[-1] < 0.5 and lambdas[-1] <= lambdas[-2] <= lambdas[-3]  # then decays
    assert abs(lambdas[-1] - lambdas[-2]) < 0.05  # and settles
    assert safe[-1]["critic_cost/vf_loss"] < safe[0]["critic_cost/vf_loss"]

    frozen = ("lambda.init=1e-6", "lambda.min_value=1e-6", "lambda.lr=0.0")
    plain = train(
        safe_ppo_config(sft_run, task_files, cost_file, "ppo", "train.iterations=20", *frozen)
    )
    assert max(r["lambda"] for r in plain) == pytest.approx(1e-6)
    assert last_mean(plain, "cost/mean") > 0.25
    assert last_mean(plain, "cost/mean") - last_mean(safe, "cost/mean") > 1.0


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(sft_run, task_files, cost_file):
    # lambda, the cost critic and its optimizer are checkpointed and restored; 2 mini-batches.
    settings = (
        "train.iterations=6",
        "checkpoint.every=3",
        "train.sequences_per_minibatch=16",
        "train.sequences_per_device=16",
    )
    whole = train(safe_ppo_config(sft_run, task_files, cost_file, "whole", *settings))

    class Killed(Exception):
        pass

    class DiesInIteration5(SafePPOTrainer):
        def optimize(self, minibatch):
            if self.state.step == 4:
                raise Killed
            return super().optimize(minibatch)

    cfg = safe_ppo_config(sft_run, task_files, cost_file, "cut", *settings)
    built = build_safe_ppo_trainer(cfg)
    dying = DiesInIteration5(
        cfg, built.unwrapped_model, built.tokenizer, built.prompts, built.reward,
        critic=built.critic, cost=built.cost, cost_critic=built.cost_critic,
    )  # fmt: skip
    with pytest.raises(Killed):
        dying.train()
    cut = cost_file.parent / "cut"
    assert latest_checkpoint(cut).name == "step-3"
    torch.manual_seed(99)  # the resumed process starts with another global RNG state
    train(
        safe_ppo_config(sft_run, task_files, cost_file, "ignored", *settings, f"resume_from={cut}")
    )
    got = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]
    for want, have in zip(whole, got, strict=True):
        assert "critic_cost/vf_loss" in want and "lambda" in want
        for key, value in want.items():
            if not key.startswith(_CLOCK):
                assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (want["step"], key)


def test_config_needs_a_cost_source_and_a_matching_critic(sft_run, task_files, cost_file):
    with pytest.raises(ConfigError, match="costs: give at least one source"):
        build_safe_ppo_trainer(safe_ppo_config(sft_run, task_files, cost_file, "x", "costs=[]"))
    with pytest.raises(ConfigError, match=r"cost_critic is set but advantage\.estimator=grpo"):
        safe_ppo_config(
            sft_run, task_files, cost_file, "x", "advantage.estimator=grpo", "critic=null",
            "cost_critic.lr=1e-3",
        )  # fmt: skip


def test_a_cost_model_is_a_cost_source_and_a_reward_model_is_refused(
    sft_run, task_files, cost_file
):
    from alignkit.models import load_reward_model

    for kind in ("reward", "cost"):
        model, tokenizer = load_reward_model("tiny", kind=kind, seed=3)
        model.save_pretrained(cost_file.parent / kind, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=r"costs: reward_model:.* is a reward model"):
        build_safe_ppo_trainer(
            safe_ppo_config(
                sft_run,
                task_files,
                cost_file,
                "rm",
                f"costs=[{{model: {cost_file.parent}/reward}}]",
            )
        )
    cfg = safe_ppo_config(
        sft_run, task_files, cost_file, "cm", f"costs=[{{model: {cost_file.parent}/cost}}]"
    )
    trainer = build_safe_ppo_trainer(cfg)
    costs = trainer.cost(
        ["How do I bake bread?"] * 2, ["Mix flour.", "Sure, here is how"], [{}, {}]
    )
    assert costs.shape == (2,) and torch.isfinite(costs).all() and costs[0] != costs[1]
