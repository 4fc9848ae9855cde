"""Online RL end to end on the tiny model and the bundled digit-sorting task.

One short SFT warm-up per session (so some samples are right from the start), then each test
runs a few seconds of RL from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import accelerate_launch
from metric_helpers import is_clock_metric
from online_helpers import REWARD_RISE, mean_of, rl_config, train

from alignkit.errors import ConfigError
from alignkit.tracking import latest_checkpoint, read_metrics
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("grpo", ()),
        ("rloo", ()),
        ("reinforce++", ("kl.coef=0.01",)),
        ("reinforce", ("rollout.prompts_per_iteration=16",)),
        ("ppo", ("critic.lr=3e-3", "train.epochs_per_iteration=2")),
    ],
)
def test_each_method_raises_the_reward_of_the_sorting_task(sort_task, method, extra):
    cfg = rl_config(sort_task, method, f"rise_{method}", "train.iterations=40", *extra)
    _, records = train(cfg)
    rewards = [r for r in records if "reward/mean" in r]
    first, last = mean_of(rewards[:5], "reward/mean"), mean_of(rewards[-5:], "reward/mean")
    assert last - first > REWARD_RISE, (method, first, last)
    if method == "ppo":
        # A fresh value head explains nothing (about -10: it predicts 0); it learns at least
        # the mean return (explained variance near 0; per-prompt values would take longer).
        assert rewards[0]["critic/vf_explained_var"] < -1.0
        assert mean_of(rewards[-5:], "critic/vf_explained_var") > -0.5
        assert "critic/vf_loss" in records[-1]


def test_micro_batch_split_does_not_change_the_update(sort_task):
    # Adam's first step is lr * sign(g) and clipping rescales: both hide a wrong normaliser.
    # With eps >> |g| and no clipping the update is ~lr * g, and the gradient norm is logged.
    runs = []
    for per_device in (64, 8, 16):
        cfg = rl_config(
            sort_task,
            "grpo",
            f"split{per_device}",
            "train.iterations=1",
            f"train.sequences_per_device={per_device}",
            "policy_loss.agg=seq-mean-token-mean",
            "policy_loss.entropy_coef=0.01",
            "kl.coef=0.1",
            "kl.placement=loss",
            "optim.eps=1.0",
            "optim.max_grad_norm=null",
        )
        trainer, records = train(cfg)
        params = [p.detach().clone() for p in trainer.unwrapped_model.parameters()]
        runs.append((records[-1], params))
    (first, weights), others = runs[0], runs[1:]
    for record, other in others:
        for key in ("grad_norm", "actor/entropy", "actor/kl_loss"):
            assert record[key] == pytest.approx(first[key], rel=1e-5, abs=1e-8), key
        # On policy, the pg loss is a mean of +-1-sized terms (normalised advantages times a
        # ratio of 1) that cancel to about 1e-7: float32 round-off of such a sum, not a signal.
        # A wrong normaliser shows in the gradient norm and the weights.
        assert record["actor/pg_loss"] == pytest.approx(first["actor/pg_loss"], abs=1e-6)
        for a, b in zip(weights, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("grpo", ("kl.coef=0.05", "kl.placement=loss")),
        # The critic and its optimizer are checkpointed and restored too; 2 mini-batches.
        ("ppo", ("train.sequences_per_minibatch=32", "kl.coef=0.05", "kl.controller=adaptive")),
    ],
)
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(sort_task, method, extra):
    settings = ("train.iterations=6", "checkpoint.every=3", *extra)
    _, whole = train(rl_config(sort_task, method, f"whole_{method}", *settings))

    class Killed(Exception):
        pass

    class DiesInIteration5(PolicyGradientTrainer):
        def optimize(self, minibatch):
            if self.state.step == 4:
                raise Killed
            return super().optimize(minibatch)

    cfg = rl_config(sort_task, method, f"cut_{method}", *settings)
    built = build_pg_trainer(cfg)
    dying = DiesInIteration5(
        cfg, built.unwrapped_model, built.tokenizer, built.prompts, built.reward,
        critic=built.critic,
    )  # fmt: skip
    with pytest.raises(Killed):
        dying.train()
    cut = sort_task["root"] / f"cut_{method}"
    assert latest_checkpoint(cut).name == "step-3"
    torch.manual_seed(99)  # the resumed process starts with another global RNG state
    train(rl_config(sort_task, method, "ignored", *settings, f"resume_from={cut}"))
    got = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]
    for want, have in zip(whole, got, strict=True):
        for key, value in want.items():
            if not is_clock_metric(key):
                assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (want["step"], key)


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_a_large_kl_coefficient_keeps_the_policy_near_the_reference(sort_task, placement):
    # 16 iterations: at 8, seeds 0 and 2 of the reward placement had not separated yet (the held
    # run's KL was 0.87-1.11x the free run's); at 16 it is 0.23-0.70x over seeds 0-3.
    settings = ("train.iterations=16", "optim.lr=3e-3", f"kl.placement={placement}")
    # kl/mean is logged when a KL term is on; 1e-8 is "off" for the update.
    _, free = train(rl_config(sort_task, "grpo", f"free_{placement}", *settings, "kl.coef=1e-8"))
    _, held = train(rl_config(sort_task, "grpo", f"held_{placement}", *settings, "kl.coef=1.0"))
    free_kl, held_kl = mean_of(free[-4:], "kl/mean"), mean_of(held[-4:], "kl/mean")
    assert held_kl < 0.75 * free_kl, (placement, free_kl, held_kl)


def test_adaptive_controller_holds_the_kl_near_its_target(sort_task):
    # At lr 3e-3 the uncontrolled KL sits near 1.2 nats/token; the multiplicative rule must
    # bring it into [target / 3, 2 x target] within 45 iterations. Over seeds 0-3 the last six
    # iterations' KL is 0.23-0.43 after 45 (after 30 it was 0.32-0.56, and a round-off change in
    # the gradient norm's summation order moved seed 0 to 0.69).
    target = 0.3
    cfg = rl_config(
        sort_task,
        "grpo",
        "adaptive",
        "train.iterations=45",
        "optim.lr=3e-3",
        "kl.placement=loss",
        "kl.coef=0.1",
        "kl.controller=adaptive",
        "kl.rule=multiplicative",
        f"kl.target={target}",
    )
    _, records = train(cfg)
    early = mean_of(records[1:5], "kl/mean")
    late = mean_of(records[-6:], "kl/mean")
    assert early > 2 * target, early
    assert target / 3 < late < 2 * target, late
    assert records[-1]["kl/coef"] > 10 * records[0]["kl/coef"]


def test_batch_settings_that_do_not_divide_name_the_valid_values(sort_task):
    with pytest.raises(ConfigError, match=r"valid: \[1, 2, 4, 8, 16, 32, 64\]"):
        rl_config(sort_task, "grpo", "bad", "train.sequences_per_minibatch=48")
    with pytest.raises(
        ConfigError, match=r"sequences_per_device=5 .* valid: \[1, 2, 4, 8, 16, 32\]"
    ):
        rl_config(
            sort_task,
            "grpo",
            "bad",
            "train.sequences_per_minibatch=32",
            "train.sequences_per_device=5",
        )


def test_a_bad_reward_function_exits_2_through_the_cli(sort_task, tmp_path):
    reward_file = tmp_path / "bad_reward.py"
    reward_file.write_text(
        "def shout(prompts, completions, **_):\n    return ['loud'] * len(completions)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    command = [
        sys.executable,
        "-m",
        "alignkit",
        "train",
        "grpo",
        f"output_dir={tmp_path}",
        f"model.name={sort_task['model']}",
        f"data.train_file={sort_task['sort_prompts']}",
        f"rewards=[{{function: {reward_file}:shout}}]",
        "train.iterations=1",
        "logging.progress_bar=false",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "reward function" in done.stderr + done.stdout
    assert "shout" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_samples_table_and_start_up_evaluation(sort_task):
    cfg = rl_config(
        sort_task,
        "grpo",
        "samples",
        "train.iterations=2",
        "train.samples_every=2",
        f"data.eval_file={sort_task['sort_heldout']}",
        "data.max_eval_prompts=16",
    )
    trainer, records = train(cfg)
    assert records[0]["step"] == 0 and "eval/accuracy" in records[0]
    rows = [
        json.loads(line)
        for line in (trainer.run_dir.root / "samples" / "iteration-000002.jsonl").open()
    ]
    assert len(rows) == 64
    assert {"prompt", "completion", "reward"} <= rows[0].keys()
    assert 0.0 <= rows[0]["reward"] <= 1.0


def test_disable_dropout_zeroes_modules_and_attention_probabilities():
    from torch import nn

    from alignkit.trainers.online import disable_dropout

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_dropout = 0.1  # read in forward by transformers' attention layers
            self.drop = nn.Dropout(0.2)

    model = nn.Sequential(Attention(), nn.Dropout(0.3))
    assert disable_dropout(model) == 3
    assert model[0].attention_dropout == 0.0 and model[0].drop.p == 0.0 and model[1].p == 0.0
    assert disable_dropout(model) == 0


def test_a_file_that_contradicts_the_method_is_refused(tmp_path, capsys):
    from alignkit.cli import main

    config = tmp_path / "rloo_by_mistake.yaml"
    config.write_text("advantage:\n  estimator: rloo\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "grpo", "-c", str(config)])
    assert exit_info.value.code == 2
    assert "advantage.estimator is 'rloo', but `alignkit train grpo`" in capsys.readouterr().err


def test_reinforce_without_a_baseline_is_the_returns_estimator(sort_task):
    cfg = rl_config(sort_task, "reinforce", "no_baseline", "advantage.estimator=returns")
    assert cfg.advantage.resolved_estimator == "returns"
    assert cfg.policy_loss.name == "policy_gradient"


def test_a_constant_reward_is_warned_about_loudly(sort_task, tmp_path, capsys):
    reward_file = tmp_path / "constant.py"
    reward_file.write_text(
        "def same(prompts, completions, **_):\n    return [1.0] * len(completions)\n"
    )
    cfg = rl_config(
        sort_task,
        "grpo",
        "constant",
        "train.iterations=3",
        f"rewards=[{{function: {reward_file}:same}}]",
    )
    _, records = train(cfg)
    assert [r["reward/zero_std_frac"] for r in records] == [1.0, 1.0, 1.0]
    assert all(r["actor/pg_loss"] == 0.0 for r in records)  # every advantage is exactly 0
    out = capsys.readouterr().out
    assert "WARNING iteration 3: 100% of the groups have the same reward" in out


def test_old_logprobs_reuse_the_behaviour_logprobs_in_fp32_and_are_rescored_under_bf16(
    sort_task,
):
    # Two epochs of two mini-batches: pi_old is still the sampling policy, so in fp32 the
    # recorded log-probs stand for it (they equal a re-scoring forward); bf16 re-scores.
    settings = ("train.sequences_per_minibatch=32", "train.epochs_per_iteration=2")
    trainer = build_pg_trainer(rl_config(sort_task, "grpo", "reuse32", *settings))
    assert not trainer.exactly_on_policy and trainer.behaviour_is_old_policy
    prompts, offset = trainer.iteration_prompts(0)
    exp = trainer.make_experience(prompts, offset, torch.Generator().manual_seed(1))
    assert exp.old_logprobs is exp.behaviour_logprobs
    rescored = trainer.score_logprobs(trainer.model, exp)
    torch.testing.assert_close(rescored, exp.behaviour_logprobs, rtol=0, atol=1e-5)

    bf16 = build_pg_trainer(rl_config(sort_task, "grpo", "reuse16", *settings, "precision=bf16"))
    assert not bf16.behaviour_is_old_policy


def test_progress_shows_the_iteration_and_the_prompt_epoch(sort_task, capsys):
    cfg = rl_config(sort_task, "grpo", "progress", "train.iterations=2")
    trainer, records = train(cfg)
    prompts = len(trainer.prompts)
    said = capsys.readouterr().out
    assert f"iteration 2/2 prompt epoch {2 * 8 / prompts:.2f}" in said
    assert "epoch 0.00" not in said
    assert [r["epoch"] for r in records] == pytest.approx([8 / prompts, 16 / prompts])


@pytest.mark.multiprocess
def test_the_samples_table_gathers_every_processes_rows(sort_task, tmp_path):
    """`accelerate launch` with 2 processes: the table holds all 64 sequences (rank 0's 32
    only, before)."""
    settings = [
        f"output_dir={tmp_path}",
        "run_name=two",
        f"model.name={sort_task['model']}",
        f"data.train_file={sort_task['sort_prompts']}",
        "data.max_prompt_length=32",
        "rewards=[{function: sort_match}]",
        "rollout.prompts_per_iteration=8",
        "rollout.samples_per_prompt=8",
        "rollout.max_new_tokens=5",
        "train.iterations=1",
        "train.sequences_per_device=32",
        "logging.progress_bar=false",
        "logging.plots=false",
    ]
    done = accelerate_launch("-m", "alignkit", "train", "grpo", *settings, root=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        json.loads(line)
        for line in (tmp_path / "two" / "samples" / "iteration-000001.jsonl").open()
    ]
    assert len(rows) == 64
    assert sorted({r["group"] for r in rows}) == list(range(8))  # both processes' prompts
