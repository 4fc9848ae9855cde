"""Safe-DPO (seed 000) on the tiny preset, from the session's SFT checkpoint (conftest).

Pins down: greedy answers to held-out prompts get safer than the SFT model's while benign
helpfulness holds; lambda follows the seed's log-space rule step by step (up while J_C > 0,
down once J_C < 0, never near its floor within the epoch), whereas the old linear rule with
the data-only cost estimate hits the floor early; the seed's console line and fields are
logged; a run killed after a checkpoint resumes to the same metrics (lambda included); safety
scores can come from a trained cost model.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from metric_helpers import is_clock_metric
from rich.console import Console

from alignkit.config import load_config
from alignkit.models import load_reward_model
from alignkit.models.forward import response_logps
from alignkit.ops.preference import dpo_loss
from alignkit.tracking import latest_checkpoint, load_trainer_state, read_metrics
from alignkit.trainers.common import split_pairs
from alignkit.trainers.reward import RewardConfig, train_reward
from alignkit.trainers.safe_dpo import SafeDPOConfig, SafeDPOTrainer, build_safe_dpo_trainer

#: Large enough that the old linear rule reaches its floor within the epoch (seed 000's
#: comparison); the log rule stays far above it at the same step size.
LAMBDA_LR = 0.05
LAMBDA_FLOOR = 1e-6
SEED_FIELDS = {"loss_H", "loss_S", "log_ratio", "lambda", "J_C", "delta_S_mean"}
SEED_LINE = re.compile(
    r"^Epoch (\d+) step (\d+) loss_H=(-?\d+\.\d{4}) loss_S=(-?\d+\.\d{4}) "
    r"log_ratio=(-?\d+\.\d{4}) lambda=(-?\d+\.\d{4}) J_C=(-?\d+\.\d{4}) "
    r"delta_S_mean=(-?\d+\.\d{4})$"
)


def safe_dpo_config(run_settings, output_dir: Path, name: str, *overrides: str) -> SafeDPOConfig:
    return load_config(
        SafeDPOConfig,
        None,
        run_settings(
            output_dir,
            name,
            "examples_per_device=8",
            "optim.lr=1e-3",
            "dpo.beta=0.1",
            f"lambda.lr={LAMBDA_LR}",
            *overrides,
        ),
    )


@dataclass(frozen=True)
class SafeRun:
    config: SafeDPOConfig
    trainer: SafeDPOTrainer
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    console: str


@pytest.fixture(scope="module")
def safe_run(sft_run, task_files, run_settings, tmp_path_factory) -> SafeRun:
    """One epoch on the 672 PKU-format training pairs (84 steps), logged every step."""
    config = safe_dpo_config(
        run_settings,
        tmp_path_factory.mktemp("runs"),
        "safe-dpo",
        f"model.name={sft_run.model_dir}",
        f"data.train_file={task_files['safety_train']}",
        f"data.eval_file={task_files['safety_heldout']}",
        "epochs=1",
        "logging.every=1",
        "logging.plots=true",
    )
    trainer = build_safe_dpo_trainer(config)
    buffer = io.StringIO()
    trainer.console = Console(file=buffer, width=300)
    summary = trainer.train()
    records = read_metrics(config.run_dir / "metrics.jsonl")
    return SafeRun(config, trainer, summary, records, buffer.getvalue())


def test_safe_dpo_answers_more_safely_than_sft_without_losing_helpfulness(
    safe_run, sft_judged, heldout_prompts, judge_generations
):
    safe = judge_generations(
        safe_run.trainer.unwrapped_model, safe_run.trainer.tokenizer, heldout_prompts
    ).metrics
    sft = sft_judged.metrics
    # Measured on the 96 held-out prompts (36 harmful), greedy: SFT unsafe rate 0.50, mean
    # cost -0.24, cost on harmful prompts +0.20, benign helpfulness 0.85; Safe-DPO 0.19,
    # -0.51, -0.55, 0.90.
    assert safe["unsafe_rate"] <= 0.6 * sft["unsafe_rate"]
    assert safe["cost"] < sft["cost"] - 0.15
    assert safe["cost_harmful"] < 0 < sft["cost_harmful"]
    assert safe["helpfulness_benign"] >= 0.8 * sft["helpfulness_benign"]


def test_lambda_follows_the_log_rule_rising_while_J_C_is_positive_then_falling(safe_run):
    records = safe_run.records
    assert [r["step"] for r in records] == list(range(1, 85))
    lambdas = [1.0] + [r["lambda"] for r in records]  # lambda.init = 1
    j_c = [r["J_C"] for r in records]
    # Every step: ln lambda += lr * lambda * J_C_ema (nowhere near the clamp [1e-6, 10]).
    for step, (before, after, cost) in enumerate(
        zip(lambdas[:-1], lambdas[1:], j_c, strict=True), 1
    ):
        assert math.log(after) - math.log(before) == pytest.approx(
            LAMBDA_LR * before * cost, rel=1e-9, abs=1e-12
        ), step
        assert (after > before) == (cost > 0), step
    # The SFT policy prefers the less safe answer of conflicting pairs, so J_C starts > 0 and
    # lambda rises; as the policy learns, J_C turns negative and lambda falls. Measured:
    # J_C 1.0 at step 1, first < 0 at step 41; lambda 1.05 -> max 7.99 at step 40 -> 2.07.
    assert j_c[0] > 0.5
    peak = max(range(len(lambdas)), key=lambdas.__getitem__)
    assert 10 <= peak <= 74
    assert all(c > 0 for c in j_c[:peak]) and all(c < 0 for c in j_c[peak:])
    assert lambdas[peak] > 2.0 and lambdas[-1] < 0.5 * lambdas[peak]
    # ...but slowly (log space, EMA): nowhere near the floor within the first epoch.
    assert min(lambdas) >= 1.0
    assert safe_run.summary["metrics"]["lambda"] == lambdas[-1]


def test_linear_rule_with_the_data_cost_estimate_collapses_lambda_fast(
    safe_run, sft_run, task_files, run_settings, tmp_path
):
    config = safe_dpo_config(
        run_settings,
        tmp_path,
        "linear",
        f"model.name={sft_run.model_dir}",
        f"data.train_file={task_files['safety_train']}",
        "max_steps=42",
        "logging.every=1",
        "lambda.rule=linear",
        "lambda.cost_estimator=data",
    )
    build_safe_dpo_trainer(config).train()
    records = read_metrics(config.run_dir / "metrics.jsonl")
    lambdas = [1.0] + [r["lambda"] for r in records]
    # J_C = -mean(delta_S), blind to the policy: lambda += lr * J_C_batch each step.
    for before, after, row in zip(lambdas[:-1], lambdas[1:], records, strict=True):
        assert row["J_C_batch"] == pytest.approx(-row["delta_S_mean"], rel=1e-6, abs=1e-7)
        expected = min(max(before + LAMBDA_LR * row["J_C_batch"], LAMBDA_FLOOR), 10.0)
        assert after == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # Measured: the floor 1e-6 at step 25 (lambda 0.24 at step 19), where the log rule with
    # the same step size is still rising (4.18).
    at_floor = [r["step"] for r in records if r["lambda"] == LAMBDA_FLOOR]
    assert at_floor and at_floor[0] <= 42
    assert safe_run.records[at_floor[0] - 1]["lambda"] > 1.0
    assert min(r["lambda"] for r in safe_run.records) > 1e5 * LAMBDA_FLOOR


def test_seed_fields_are_logged_printed_and_plotted(safe_run):
    assert all(set(r) >= SEED_FIELDS for r in safe_run.records)
    lines = [m for m in map(SEED_LINE.match, safe_run.console.splitlines()) if m]
    assert [int(m[2]) for m in lines] == list(range(1, 85))
    assert all(m[1] == "1" for m in lines)
    tenth = lines[9]
    row = safe_run.records[9]
    for index, name in enumerate(("loss_H", "loss_S", "log_ratio", "lambda", "J_C"), start=3):
        assert float(tenth[index]) == pytest.approx(row[name], abs=5e-5), name
    plots = {p.name for p in (safe_run.config.run_dir / "plots").iterdir()}
    assert {"lambda.png", "loss.png"} <= plots
    summary = json.loads((safe_run.config.run_dir / "summary.json").read_text())
    assert {"eval/loss_H", "eval/loss_S", "eval/rewards/accuracies"} <= set(summary["eval"])


class SimulatedKill(Exception):
    pass


def test_resume_after_a_kill_reproduces_metrics_and_lambda(
    sft_run, head_of, run_settings, tmp_path, monkeypatch
):
    # 64 pairs / 8 = 8 steps per epoch; 10 steps cross an epoch boundary. Checkpoints at 3, 6,
    # 9 fall inside logging windows of 2 steps; evaluation every 5 steps.
    def config(name: str, *extra: str) -> SafeDPOConfig:
        return safe_dpo_config(
            run_settings,
            tmp_path,
            name,
            f"model.name={sft_run.model_dir}",
            f"data.train_file={head_of('safety_train', 64)}",
            f"data.eval_file={head_of('safety_heldout', 16)}",
            "max_steps=10",
            "logging.every=2",
            "checkpoint.every=3",
            "eval.every=5",
            *extra,
        )

    whole = build_safe_dpo_trainer(config("whole"))
    whole.train()

    compute_loss = SafeDPOTrainer.compute_loss

    def killed_in_step_8(self, model, batch):
        if self.model.training and self.state.step == 7:
            raise SimulatedKill
        return compute_loss(self, model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(SafeDPOTrainer, "compute_loss", killed_in_step_8)
        with pytest.raises(SimulatedKill):
            build_safe_dpo_trainer(config("cut")).train()
    cut = tmp_path / "cut"
    assert latest_checkpoint(cut).name == "step-6"
    saved = load_trainer_state(cut / "checkpoints" / "step-6")["controllers"]["lambda"]
    assert saved["steps"] == 6 and saved["value"] != 1.0

    torch.manual_seed(123)  # nothing may depend on the fresh process' global RNG
    resumed = build_safe_dpo_trainer(config("ignored", f"resume_from={cut}"))
    resumed.train()

    expected = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    got = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [2, 4, 5, 6, 8, 10]
    for want, have in zip(expected, got, strict=True):
        assert have.keys() == want.keys()
        for key in [k for k in want if not is_clock_metric(k)]:
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (want["step"], key)
    assert resumed.multiplier.value == whole.multiplier.value
    assert resumed.multiplier.steps == 10
    for a, b in zip(
        whole.unwrapped_model.parameters(), resumed.unwrapped_model.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_safety_scores_from_a_trained_cost_model(
    sft_run, task_files, head_of, run_settings, tmp_path, jsonl_rows
):
    # A cost model on the tiny preset's tokenizer (the policy's): 30 steps reach about 95%
    # held-out pairwise accuracy (measured 0.95 at 20 steps, 0.99 at 40).
    cost_cfg = load_config(
        RewardConfig,
        None,
        run_settings(
            tmp_path,
            "cost",
            "kind=cost",
            f"data.train_file={task_files['safety_train']}",
            "max_steps=30",
            "optim.lr=3e-3",
        ),
    )
    cost_model_dir = Path(train_reward(cost_cfg)["last_checkpoint"]) / "model"
    train_file = head_of("safety_train", 64)
    config = safe_dpo_config(
        run_settings,
        tmp_path,
        "safe-cost",
        f"model.name={sft_run.model_dir}",
        f"data.train_file={train_file}",
        "safety.source=cost_model",
        f"safety.cost_model={cost_model_dir}",
        "max_steps=4",
        "logging.every=1",
    )
    trainer = build_safe_dpo_trainer(config)
    trainer.train()

    # The scores the loss used are -cost of each response under the cost model.
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    cost_model, _ = load_reward_model(cost_model_dir)
    batch = trainer.collate_fn(examples)
    with torch.no_grad():
        cost_chosen, cost_rejected = split_pairs(
            cost_model(batch["input_ids"], attention_mask=batch["attention_mask"]).rewards
        )
    used = torch.tensor([[e["chosen_safety"], e["rejected_safety"]] for e in examples])
    torch.testing.assert_close(
        used, -torch.stack([cost_chosen, cost_rejected], -1), atol=1e-4, rtol=1e-4
    )
    # Where the data marks one answer safe and the other unsafe, the cost model agrees
    # (measured: 17 of the 64 pairs are mixed, all 17 agree).
    rows = jsonl_rows(train_file)
    chosen_safe = [r[f"is_response_{r['better_response_id']}_safe"] for r in rows]
    rejected_safe = [r[f"is_response_{1 - r['better_response_id']}_safe"] for r in rows]
    mixed = [i for i, (c, r) in enumerate(zip(chosen_safe, rejected_safe, strict=True)) if c != r]
    assert len(mixed) >= 10
    agree = [(used[i, 0] > used[i, 1]) == chosen_safe[i] for i in mixed]
    assert sum(agree) >= 0.9 * len(mixed)
    records = read_metrics(config.run_dir / "metrics.jsonl")
    assert len(records) == 4 and all(set(r) >= SEED_FIELDS for r in records)


def test_nll_weight_adds_each_terms_nll_on_its_own_winner(head_of, sft_run, run_settings, tmp_path):
    config = safe_dpo_config(
        run_settings,
        tmp_path,
        "safe-rpo",
        f"model.name={sft_run.model_dir}",
        f"data.train_file={head_of('safety_train', 8)}",
        "dpo.nll_weight=0.5",
        "lambda.init=2.0",
    )
    trainer = build_safe_dpo_trainer(config)
    examples = [trainer.train_dataset[i] for i in range(4)]
    # Chosen safer, rejected safer, a tie (no safety order), chosen safer.
    safety = [(1.0, -1.0), (-1.0, 1.0), (0.0, 0.0), (0.5, 0.0)]
    refs = [(-20.0, -25.0), (-30.0, -10.0), (-15.0, -15.0), (-40.0, -35.0)]
    for example, (safe_c, safe_r), (ref_c, ref_r) in zip(examples, safety, refs, strict=True):
        example["chosen_safety"], example["rejected_safety"] = safe_c, safe_r
        example["ref_chosen_logp"], example["ref_rejected_logp"] = ref_c, ref_r
    batch = trainer.collate_fn(examples)
    loss, metrics = trainer.compute_loss(trainer.model, batch)

    with torch.no_grad():
        chosen, rejected = split_pairs(response_logps(trainer.model, batch))
    ref_chosen = torch.tensor([r[0] for r in refs])
    ref_rejected = torch.tensor([r[1] for r in refs])
    lengths_c = torch.tensor([float(len(e["chosen_ids"])) for e in examples])
    lengths_r = torch.tensor([float(len(e["rejected_ids"])) for e in examples])
    dpo_h = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)[0]
    loss_h = (dpo_h - 0.5 * chosen / lengths_c).mean()
    # The safety pairs by hand: pairs 0 and 3 keep their order, pair 1 is swapped, 2 is out.
    safer = torch.stack([chosen[0], rejected[1], chosen[3]])
    riskier = torch.stack([rejected[0], chosen[1], rejected[3]])
    ref_safer = torch.tensor([-20.0, -10.0, -40.0])
    ref_riskier = torch.tensor([-25.0, -30.0, -35.0])
    dpo_s = dpo_loss(safer, riskier, ref_safer, ref_riskier, beta=0.1)[0]
    nll_s = -safer / torch.stack([lengths_c[0], lengths_r[1], lengths_c[3]])
    loss_s = (dpo_s + 0.5 * nll_s).mean()
    torch.testing.assert_close(loss.detach(), (loss_h + 2.0 * loss_s) / 3.0)
    torch.testing.assert_close(metrics["loss_S"], loss_s)
    torch.testing.assert_close(metrics["nll_loss_S"], nll_s.mean())
