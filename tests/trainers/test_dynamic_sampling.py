"""DAPO's dynamic sampling (``rollout.filter_groups``): the iteration's batch is made of
informative groups from as many rounds as needed, within the bound; the prompts of each round
follow from (seed, iteration, round) only, so a resumed run repeats them; under several
processes every process makes every round and ends with its share; and the statistics that
span the batch (the top-entropy threshold, the batch std) span the processes.

The tiny untrained model and a reward that is constant on half of the prompts (those whose
first digit is even): their groups carry no gradient and must be dropped.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import launched_pg
import pytest
import torch
from launch_helpers import accelerate_launch
from metric_helpers import is_clock_metric

from alignkit.config import load_config
from alignkit.data.synthetic import write_verifiable_tasks
from alignkit.ops import informative_groups
from alignkit.tracking import latest_checkpoint, read_metrics
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig

LAUNCHED_PG = Path(launched_pg.__file__)

REWARD = textwrap.dedent(
    """
    def half_constant(prompts, completions, **_):
        scores = []
        for prompt, completion in zip(prompts, completions):
            digit = int(next((c for c in prompt if c.isdigit()), "0"))
            varied = float(sum(map(ord, completion)) % 5) / 4
            scores.append(0.5 if digit % 2 == 0 else varied)
        return scores

    def constant(prompts, completions, **_):
        return [1.0] * len(completions)
    """
)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("filter")
    (root / "reward.py").write_text(REWARD)
    return {"root": root, **write_verifiable_tasks(root / "data")}


def filtered(task: dict[str, Path], name: str, *overrides: str, reward: str = "half_constant"):
    base = (
        f"output_dir={task['root']}",
        f"run_name={name}",
        "model.name=tiny",
        f"data.train_file={task['sort_prompts']}",
        "data.max_prompt_length=32",
        f"rewards=[{{function: {task['root'] / 'reward.py'}:{reward}}}]",
        "rollout.prompts_per_iteration=8",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=6",
        "rollout.filter_groups=true",
        "train.sequences_per_device=16",
        "optim.lr=1e-3",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
    )
    return load_config(PGConfig, None, [*get_method("grpo").defaults, *base, *overrides])


def groups_of(exp) -> tuple[int, int]:
    """(groups in the batch, informative ones)."""
    keep = informative_groups(exp.scores, exp.group_index)
    return exp.group_index.unique().numel(), exp.group_index[keep].unique().numel()


def test_the_batch_is_filled_with_informative_groups_from_extra_rounds(task):
    trainer = build_pg_trainer(filtered(task, "fill", "train.iterations=1"))
    trainer._prepare_training()  # the optimizer and the engine on the prepared model
    first, _ = trainer.iteration_prompts(0)
    exp, counts = trainer.collect_experience(0)
    assert groups_of(exp) == (8, 8)
    assert len(exp) == 32
    assert counts["rollout/filter_rounds"] >= 1  # about half of the first round was dropped
    assert counts["rollout/filtered_groups"] >= 1 and counts["rollout/filter_shortfall"] == 0
    # The batch's advantages are estimated over the kept batch: every group is centred.
    for group in exp.group_index.unique():
        rows = exp.group_index == group
        assert abs(float(exp.advantages[rows][exp.response_mask[rows]].sum())) < 1e-4
    # The rounds' prompts depend on (seed, iteration, round) only, and differ between rounds.
    again, offset = trainer.round_prompts(0, 1)
    assert [p.text for p in again] == [p.text for p in trainer.round_prompts(0, 1)[0]]
    assert [p.text for p in again] != [p.text for p in trainer.round_prompts(0, 2)[0]]
    assert [p.text for p in again] != [p.text for p in first]
    assert offset >= 1 * 8  # group ids never collide with the first round's


def test_after_the_last_round_uninformative_groups_complete_the_batch(task):
    cfg = filtered(
        task, "short", "train.iterations=1", "rollout.filter_max_rounds=2", reward="constant"
    )
    trainer = build_pg_trainer(cfg)
    trainer.train()
    record = read_metrics(trainer.run_dir.metrics_path)[-1]
    assert record["rollout/filter_rounds"] == 2
    assert record["rollout/filtered_groups"] == 3 * 8  # three rounds, nothing kept
    assert record["rollout/filter_shortfall"] == 8
    assert record["reward/zero_std_frac"] == 1.0  # the batch is still whole: 8 groups


def test_a_resumed_run_draws_the_rounds_of_the_uninterrupted_one(task):
    settings = ("train.iterations=4", "checkpoint.every=2")
    whole = build_pg_trainer(filtered(task, "whole", *settings))
    whole.train()
    expected = read_metrics(whole.run_dir.metrics_path)

    class Killed(Exception):
        pass

    class DiesInIteration3(PolicyGradientTrainer):
        def optimize(self, minibatch):
            if self.state.step == 2:
                raise Killed
            return super().optimize(minibatch)

    cfg = filtered(task, "cut", *settings)
    built = build_pg_trainer(cfg)
    dying = DiesInIteration3(
        cfg, built.unwrapped_model, built.tokenizer, built.prompts, built.reward
    )
    with pytest.raises(Killed):
        dying.train()
    cut = task["root"] / "cut"
    assert latest_checkpoint(cut).name == "step-2"
    torch.manual_seed(5)
    build_pg_trainer(filtered(task, "ignored", *settings, f"resume_from={cut}")).train()
    got = read_metrics(cut / "metrics.jsonl")
    assert max(r["rollout/filter_rounds"] for r in expected) >= 1
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for want, have in zip(expected, got, strict=True):
        for key, value in want.items():
            if not is_clock_metric(key):
                assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (want["step"], key)


# --------------------------------------------------------------------------------------
# Several processes (gloo)


def _settings(task: dict[str, Path], name: str, *extra: str) -> list[str]:
    return [
        f"output_dir={task['root']}",
        f"run_name={name}",
        "model.name=tiny",
        f"data.train_file={task['sort_prompts']}",
        "data.max_prompt_length=32",
        f"rewards=[{{function: {task['root'] / 'reward.py'}:half_constant}}]",
        "rollout.prompts_per_iteration=8",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=6",
        "train.sequences_per_device=8",
        "optim.lr=1e-3",
        "optim.eps=1.0",
        "optim.max_grad_norm=null",
        "logging.progress_bar=false",
        "logging.plots=false",
        *extra,
    ]


FILTERED = ("rollout.filter_groups=true", "train.iterations=3")
# Without filtering, the same sequences on 1 or 2 processes give the same update only if the
# top-entropy threshold and scale_rewards=batch's std are taken over both halves.
SPANNING = (
    "train.iterations=2",
    "policy_loss.top_entropy_quantile=0.4",
    "advantage.scale_rewards=batch",
)


@pytest.fixture(scope="module")
def two_processes(task) -> subprocess.CompletedProcess:
    """Runs two_filter and two_q of the tests below, made by one launch of 2 processes
    (starting processes is most of a launch's time)."""
    jobs = [
        {"method": "grpo", "recorder": "batches", "args": _settings(task, name, *settings)}
        for name, settings in (("two_filter", FILTERED), ("two_q", SPANNING))
    ]
    return accelerate_launch(LAUNCHED_PG, json.dumps(jobs), root=task["root"])


@pytest.mark.multiprocess
def test_two_processes_fill_their_shares_in_lockstep(task, two_processes):
    # The processes' prompts differ, so one needs more rounds than the other: both make every
    # round (else the collectives of make_experience would hang) and each keeps its 4 groups.
    assert two_processes.returncode == 0, two_processes.stderr[-3000:]
    run = task["root"] / "two_filter"
    for iteration in range(3):
        records = [json.loads((run / f"batch-{iteration}-{p}.json").read_text()) for p in (0, 1)]
        for record in records:
            assert (record["groups"], record["informative"]) == (4, 4), records
        for key in ("rollout/filter_rounds", "rollout/filtered_groups"):
            assert records[0][key] == records[1][key]  # global counts, the same on both
    assert max(json.loads(p.read_text())["rollout/filter_rounds"] for p in run.glob("batch-*")) >= 1


@pytest.mark.multiprocess
def test_the_entropy_quantile_and_the_batch_std_span_the_processes(task, two_processes):
    from safetensors.torch import load_file

    assert two_processes.returncode == 0, two_processes.stderr[-3000:]
    launched_pg.train("grpo", "batches", _settings(task, "one_q", *SPANNING))
    metrics, weights = {}, {}
    for name in ("one_q", "two_q"):
        metrics[name] = read_metrics(task["root"] / name / "metrics.jsonl")[-1]
        model = latest_checkpoint(task["root"] / name) / "model" / "model.safetensors"
        weights[name] = load_file(model)
    for key in ("actor/entropy_threshold", "actor/kept_token_frac", "grad_norm", "reward/mean"):
        assert metrics["two_q"][key] == pytest.approx(metrics["one_q"][key], rel=1e-4), key
    assert 0.3 < metrics["one_q"]["actor/kept_token_frac"] < 0.5
    for key, value in weights["one_q"].items():
        torch.testing.assert_close(weights["two_q"][key], value, rtol=1e-5, atol=1e-7)
