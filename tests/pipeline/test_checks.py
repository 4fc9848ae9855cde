"""A trained reward that rises while an independent judge falls is said plainly in the
pipeline's summary table (the classic pipeline's PPO: reward model 6.59 -> 8.09, judged
helpfulness 0.268 -> 0.248)."""

from __future__ import annotations

from rich.console import Console

from alignkit.pipeline import StageRecord, summary_table
from alignkit.pipeline.checks import judge_disagreements


def _records(judge_after: float, cost_after: float = -0.165, trained=("runs/rm",)):
    evaluate = {"rewards": ["synthetic", "runs/rm"]}
    return [
        StageRecord("sft", "sft", artifacts={"model": "sft/model"}),
        StageRecord(
            "sft_eval",
            "eval-policy",
            artifacts={
                "model": "sft/model",
                "rewards": ["synthetic"],
                "metrics": {"synthetic/reward/mean": 0.268, "synthetic/cost/mean": -0.165},
            },
        ),
        StageRecord(
            "ppo",
            "ppo",
            metric="reward/mean",
            before=6.59,
            after=8.09,
            artifacts={
                "model": "ppo/model",
                "input_model": "sft/model",
                "reward_sources": list(trained),
            },
        ),
        StageRecord(
            "ppo_eval",
            "eval-policy",
            artifacts={
                "model": "ppo/model",
                **evaluate,
                "metrics": {
                    "synthetic/reward/mean": judge_after,
                    "synthetic/cost/mean": cost_after,
                    "reward_ensemble[1]/reward/mean": 8.1,
                },
            },
        ),
    ]


def test_a_judge_falling_while_the_trained_reward_rises_is_flagged():
    found = judge_disagreements(_records(judge_after=0.248, cost_after=-0.117))
    assert [(d.stage, d.judge_metric) for d in found] == [
        ("ppo", "synthetic/cost/mean"),
        ("ppo", "synthetic/reward/mean"),
    ]
    text = found[1].text()
    assert "possible reward hacking" in text and "0.268 -> 0.248" in text
    assert "6.590 -> 8.090" in text and "(sft_eval -> ppo_eval)" in text


def test_agreeing_or_trained_on_sources_are_not_flagged():
    assert judge_disagreements(_records(judge_after=0.3)) == []  # both rose
    # trained on the judge itself: it is no independent judge
    assert judge_disagreements(_records(judge_after=0.2, trained=("synthetic",))) == []
    # the trained model, reported under its ensemble's name, is never taken for a judge
    records = _records(judge_after=0.3)
    records[1].artifacts["metrics"]["reward_ensemble[1]/reward/mean"] = 9.0
    assert judge_disagreements(records) == []


def test_the_summary_table_says_it_in_a_note_column():
    records = _records(judge_after=0.248)
    for d in judge_disagreements(records):
        records[2].note = d.text()
    console = Console(width=400, record=True)
    console.print(summary_table(records))
    text = console.export_text()
    assert "note" in text and "possible reward hacking" in text
    plain = [StageRecord("sft", "sft")]
    console.print(summary_table(plain))
    assert "note" not in console.export_text()
