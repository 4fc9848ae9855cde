"""Both example pipelines finish, and every training stage's key metric moves the right way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.pipeline import load_pipeline, run_pipeline

EXAMPLES = Path(__file__).parents[2] / "examples"
LOWER_IS_BETTER = {"loss", "eval/loss"}


@pytest.mark.parametrize("name", ["classic", "hybrid"])
def test_example_pipeline_runs_and_each_stage_improves(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(EXAMPLES)
    records = run_pipeline(load_pipeline(f"examples/pipelines/{name}.yaml"))
    assert all(r.status == "completed" for r in records)
    trained = [r for r in records if r.before is not None]
    assert {r.kind for r in trained} >= {"sft", "rm", "ppo"}
    for r in trained:
        if r.name == "ipo" and r.metric == "eval/rewards/margins":
            # IPO regresses the margin onto beta / (2 beta) = 0.5 (examples/ipo.yaml), from
            # either side: improving is getting closer to it, not growing past it.
            assert abs(r.after - 0.5) < abs(r.before - 0.5), (r.name, r.before, r.after)
        elif r.metric in LOWER_IS_BETTER:
            assert r.after < r.before, (r.name, r.metric, r.before, r.after)
        else:
            assert r.after > r.before, (r.name, r.metric, r.before, r.after)
    ppo = next(r for r in records if r.kind == "ppo")
    assert ppo.after > ppo.before + 1.0  # the reward model's score, per sequence
    evaluation = records[-1].artifacts["metrics"]
    assert evaluation["kl_k1/per_token"] > 0  # KL to the SFT model, on the policy's samples
    if name == "classic":
        # PPO raises the reward model's score while the task's judge rates the answers lower:
        # the summary says so (reward hacking, found by the newcomer trial)
        before = records[2].artifacts["metrics"]["synthetic/reward/mean"]
        after = evaluation["synthetic/reward/mean"]
        assert after < before, (before, after)
        assert "possible reward hacking" in ppo.note and f"{before:.3f} -> {after:.3f}" in ppo.note
        summary = json.loads((tmp_path / "runs/pipelines/classic/summary.json").read_text())
        assert "synthetic/reward/mean" in {d["judge_metric"] for d in summary["disagreements"]}
