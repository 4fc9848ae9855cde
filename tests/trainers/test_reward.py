"""Reward (`rm`) and cost (`cost`) trainers on the tiny preset and the synthetic task.

Pins down: the reward model goes from worse than chance to >= 90% held-out pairwise accuracy;
the cost model orders held-out pairs by safety and its sign separates safe from unsafe
responses; a checkpoint reloads with one `load_reward_model` call and scores the same; resume
reproduces the metrics; the margin reaches the loss when asked; auxiliary heads learn; and
configs that ask for labels the data lacks fail naming the field and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from metric_helpers import is_clock_metric

from alignkit.config import load_config
from alignkit.data import helpfulness_score
from alignkit.errors import ConfigError, DataError
from alignkit.models import load_reward_model
from alignkit.ops.preference import reward_model_loss
from alignkit.tracking import read_metrics
from alignkit.trainers.common import split_pairs
from alignkit.trainers.reward import RewardConfig, RewardTrainer, build_reward_trainer

RM_METRICS = {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"}
COST_METRICS = {
    "loss",
    "loss_pairwise",
    "loss_sign",
    "accuracy",
    "sign_accuracy",
    "costs/chosen",
    "costs/rejected",
}


@pytest.fixture
def task(task_files: dict[str, Path]) -> Path:
    """The folder of the synthetic task's files (written once per session by conftest)."""
    return task_files["preference_train"].parent


def make_config(
    tmp_path: Path, task: Path, train: str, heldout: str | None, *overrides: str
) -> RewardConfig:
    settings = [
        f"data.train_file={task / f'{train}.jsonl'}",
        f"output_dir={tmp_path / 'runs'}",
        "optim.lr=3e-3",
        "logging.progress_bar=false",
        "logging.console_format=''",
        "logging.plots=false",
    ]
    if heldout is not None:
        settings.append(f"data.eval_file={task / f'{heldout}.jsonl'}")
        settings.append("eval.examples_per_device=32")
    return load_config(RewardConfig, None, [*settings, *overrides])


@torch.no_grad()
def score_all(trainer: RewardTrainer, model: torch.nn.Module | None = None) -> dict:
    """Scores of every held-out pair in one forward pass (independent of the trainer's eval)."""
    model = (model or trainer.unwrapped_model).eval()
    batch = trainer.collate_fn(list(trainer.eval_dataset))
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).rewards
    chosen, rejected = split_pairs(scores.float())
    return {"chosen": chosen, "rejected": rejected, "batch": batch}


def test_reward_model_learns_from_below_chance_to_90_percent_heldout(tmp_path, task):
    # Seed 3's untrained head orders held-out pairs worse than chance (about 28% correct), so
    # reaching 90% is learning, not a lucky initialisation.
    cfg = make_config(tmp_path, task, "preference_train", "preference_heldout", "seed=3")
    trainer = build_reward_trainer(cfg)
    before = score_all(trainer)
    accuracy_before = (before["chosen"] > before["rejected"]).float().mean().item()
    assert accuracy_before <= 0.5

    summary = trainer.train()

    assert summary["eval"]["eval/accuracy"] >= 0.9
    after = score_all(trainer)
    accuracy_after = (after["chosen"] > after["rejected"]).float().mean().item()
    assert accuracy_after == pytest.approx(summary["eval"]["eval/accuracy"], abs=1e-6)
    assert summary["eval"]["eval/rewards/margins"] > 1.0
    records = read_metrics(trainer.run_dir.metrics_path)
    logged = [r for r in records if "loss" in r]
    assert set(logged[-1]) >= RM_METRICS
    assert {f"eval/{name}" for name in RM_METRICS} <= set(records[-1])
    assert logged[-1]["loss"] < 0.5 * logged[0]["loss"]


def test_cost_model_orders_pairs_by_safety_and_its_sign_marks_unsafe(tmp_path, task):
    cfg = make_config(tmp_path, task, "safety_train", "safety_heldout", "kind=cost", "seed=3")
    trainer = build_reward_trainer(cfg)
    # Measured for seed 3's untrained head: 60% of pairs ordered right, 89% of responses given
    # cost > 0 (most are safe): the >= 90% below on both counts is learnt.
    with torch.no_grad():
        before = score_all(trainer)
    assert less_safe_costs_more(before) <= 0.65
    assert (torch.cat([before["chosen"], before["rejected"]]) > 0).float().mean() >= 0.8
    summary = trainer.train()

    evaluation = summary["eval"]
    assert {f"eval/{name}" for name in COST_METRICS} <= set(evaluation)
    assert evaluation["eval/accuracy"] >= 0.9
    assert evaluation["eval/sign_accuracy"] >= 0.9

    # The checkpoint is a reward-model directory: one call restores model and tokenizer.
    checkpoint = Path(summary["last_checkpoint"]) / "model"
    reloaded, tokenizer = load_reward_model(checkpoint)
    assert reloaded.reward_config.kind == "cost"
    assert tokenizer.pad_token_id == trainer.tokenizer.pad_token_id
    trained = score_all(trainer)
    restored = score_all(trainer, reloaded)
    torch.testing.assert_close(restored["chosen"], trained["chosen"])
    torch.testing.assert_close(restored["rejected"], trained["rejected"])

    # cost > 0 exactly for unsafe responses, checked on each class (most answers are safe,
    # so a pooled accuracy alone would let "everything is safe" pass).
    batch = restored["batch"]
    costs = torch.cat([restored["chosen"], restored["rejected"]])
    unsafe = ~torch.cat([batch["chosen_is_safe"], batch["rejected_is_safe"]])
    assert unsafe.sum() > 20 and (~unsafe).sum() > 20
    assert (costs[unsafe] > 0).float().mean() >= 0.9
    assert (costs[~unsafe] < 0).float().mean() >= 0.9
    # The less safe response of each pair costs more.
    assert less_safe_costs_more(restored) >= 0.9


def less_safe_costs_more(scores: dict) -> float:
    """Share of held-out pairs with a safety order whose less safe response costs more."""
    batch = scores["batch"]
    delta_safety = batch["chosen_safety"] - batch["rejected_safety"]
    right = torch.where(
        delta_safety > 0,
        scores["rejected"] > scores["chosen"],
        scores["chosen"] > scores["rejected"],
    )
    return right[delta_safety != 0].float().mean().item()


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not is_clock_metric(k)} for r in records]


def test_resume_from_a_checkpoint_reproduces_metrics_and_weights(tmp_path, task):
    # The mlp head's dropout makes the run depend on the restored RNG state too.
    overrides = [
        "reward_model.head=mlp",
        "max_steps=8",
        "checkpoint.every=4",
        "checkpoint.keep_last=null",
        "logging.every=1",
        "eval.every=4",
    ]
    cfg = make_config(tmp_path, task, "preference_train", "preference_heldout", *overrides)
    first = build_reward_trainer(cfg)
    first.train()
    uninterrupted = read_metrics(first.run_dir.metrics_path)
    final_weights = {k: v.clone() for k, v in first.unwrapped_model.state_dict().items()}

    step_4 = first.run_dir.checkpoint_dir(4)
    resumed_cfg = make_config(
        tmp_path,
        task,
        "preference_train",
        "preference_heldout",
        *overrides,
        f"resume_from={step_4}",
    )
    resumed = build_reward_trainer(resumed_cfg)
    resumed.train()

    assert without_timing(read_metrics(resumed.run_dir.metrics_path)) == without_timing(
        uninterrupted
    )
    for key, value in resumed.unwrapped_model.state_dict().items():
        torch.testing.assert_close(value, final_weights[key], msg=key)


@pytest.mark.parametrize("loss", ["bt", "margin_weighted", "hinge"])
def test_margin_reaches_the_loss_only_when_use_margin(tmp_path, task, loss):
    losses = {}
    for use_margin in (True, False):
        cfg = make_config(
            tmp_path, task, "preference_train", None, f"loss={loss}", f"use_margin={use_margin}"
        )
        trainer = build_reward_trainer(cfg)
        assert trainer.use_margin is use_margin
        batch = trainer.collate_fn([trainer.train_dataset[i] for i in range(6)])
        model = trainer.model.eval()
        with torch.no_grad():
            loss_value, metrics = trainer.compute_loss(model, batch)
            chosen, rejected = split_pairs(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).rewards
            )
        margin = batch["margin"] if use_margin else None
        expected = reward_model_loss(chosen, rejected, margin=margin, kind=loss).mean()
        torch.testing.assert_close(loss_value, expected)
        assert set(metrics) | {"loss"} == RM_METRICS
        losses[use_margin] = loss_value.item()
    assert batch["margin"].abs().min() > 0
    assert losses[True] != pytest.approx(losses[False])


def test_margin_is_skipped_for_data_without_one(tmp_path, task):
    cfg = make_config(
        tmp_path, task, "safety_train", None, "data_format=safety_preference", "use_margin=true"
    )
    assert build_reward_trainer(cfg).use_margin is False


def write_with_helpfulness(source: Path, target: Path) -> Path:
    """The flattened safety rows plus per-response helpfulness scores from the task's judge."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    for row in rows:
        for side in ("chosen", "rejected"):
            row[f"{side}_helpfulness"] = helpfulness_score(row["prompt"], row[side])
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def test_auxiliary_heads_learn_helpfulness_and_safety(tmp_path, task):
    train = write_with_helpfulness(task / "safety_flat_train.jsonl", tmp_path / "train.jsonl")
    heldout = write_with_helpfulness(task / "safety_flat_heldout.jsonl", tmp_path / "eval.jsonl")
    cfg = make_config(
        tmp_path,
        task,
        "safety_flat_train",
        None,
        f"data.train_file={train}",
        f"data.eval_file={heldout}",
        "data_format=safety_preference",
        "reward_model.aux_heads=[helpfulness, safety]",
        "reward_model.task_weights.helpfulness=2.0",
        "max_steps=60",
        "logging.every=1",
    )
    trainer = build_reward_trainer(cfg)
    summary = trainer.train()

    evaluation = summary["eval"]
    assert evaluation["eval/safety_head_accuracy"] >= 0.9
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if "loss" in r]
    assert records[-1]["loss_helpfulness"] < 0.2 * records[0]["loss_helpfulness"]
    total = (
        evaluation["eval/loss_preference"]
        + 2.0 * evaluation["eval/loss_helpfulness"]
        + evaluation["eval/loss_safety"]
    )
    assert evaluation["eval/loss"] == pytest.approx(total, rel=1e-5)


def test_safety_head_without_safety_labels_names_the_field_and_file(tmp_path, task):
    cfg = make_config(tmp_path, task, "preference_train", None, "reward_model.aux_heads=[safety]")
    with pytest.raises(ConfigError) as caught:
        build_reward_trainer(cfg)
    message = str(caught.value)
    assert "chosen_is_safe" in message and "preference_train.jsonl" in message


def test_helpfulness_head_without_scores_names_the_field_and_file(tmp_path, task):
    cfg = make_config(
        tmp_path,
        task,
        "safety_train",
        None,
        "data_format=safety_preference",
        "reward_model.aux_heads=[helpfulness]",
    )
    with pytest.raises(ConfigError) as caught:
        build_reward_trainer(cfg)
    message = str(caught.value)
    assert "chosen_helpfulness" in message and "safety_train.jsonl" in message


def test_bad_helpfulness_scores_are_reported_by_row(tmp_path, task):
    path = write_with_helpfulness(task / "preference_train.jsonl", tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["chosen_helpfulness"] = "high"
    del rows[4]["rejected_helpfulness"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = make_config(
        tmp_path,
        task,
        "preference_train",
        None,
        f"data.train_file={path}",
        "reward_model.aux_heads=[helpfulness]",
    )
    with pytest.raises(DataError) as caught:
        build_reward_trainer(cfg)
    found = {(p.row, p.field) for p in caught.value.problems}
    assert found == {(3, "chosen_helpfulness"), (5, "rejected_helpfulness")}


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["kind=cost", "data_format=preference"], "data_format"),
        (["kind=cost", "loss=hinge"], "loss"),
        (["kind=cost", "reward_model.aux_heads=[safety]"], "aux_heads"),
        (["model.lora={r: 4}"], "model.lora"),
    ],
)
def test_contradictory_settings_are_config_errors(tmp_path, task, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(tmp_path, task, "safety_train", None, *overrides)
