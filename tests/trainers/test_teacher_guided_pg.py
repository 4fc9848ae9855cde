"""GRPO with teacher-guided rollouts: config, engine, importance weights and metrics wired."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import load_config
from alignkit.data.synthetic import write_verifiable_tasks
from alignkit.errors import ConfigError
from alignkit.rollout.teacher import TeacherGuidedEngine
from alignkit.tracking import read_metrics
from alignkit.trainers.pg import build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig


def grpo_config(tmp_path, *overrides: str) -> PGConfig:
    paths = write_verifiable_tasks(tmp_path / "data")
    base = (
        f"output_dir={tmp_path}",
        "run_name=grpo_teacher",
        "model.name=tiny",
        f"data.train_file={paths['sort_prompts']}",
        "data.max_prompt_length=32",
        "rewards=[{function: sort_match}]",
        "rollout.prompts_per_iteration=4",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=6",
        "train.iterations=2",
        "train.epochs_per_iteration=2",
        "train.sequences_per_device=16",
        "kl.coef=0.05",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
    )
    return load_config(PGConfig, None, [*get_method("grpo").defaults, *base, *overrides])


def test_grpo_with_a_teacher_samples_from_the_proposal_and_weights_the_loss(tmp_path):
    cfg = grpo_config(tmp_path, "rollout.teacher=tiny", "rollout.alpha=kl_symmetry")
    trainer = build_pg_trainer(cfg)
    assert isinstance(trainer.engine, TeacherGuidedEngine)
    assert not trainer.engine_samples_policy and not trainer.exactly_on_policy
    trainer.train()
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if "sampling/alpha_mean" in r]
    assert len(records) == 2
    for record in records:
        # Same preset, same seed: the teacher equals the initial policy, so alpha is 1 and the
        # weights are 1 (the untrained policy earns no reward here, so it does not move).
        assert 0.0 <= record["sampling/alpha_mean"] <= 1.0
        assert record["sampling/fallback_share"] == 0.0
        assert 0.0 < record["sampling/ess"] <= 1.0 + 1e-6
        assert record["sampling/alpha_mean"] == pytest.approx(1.0, abs=1e-6)
        assert record["sampling/is_weight_max"] == pytest.approx(1.0, abs=1e-4)


def test_fixed_alpha_gives_importance_weights_below_the_cap(tmp_path):
    cfg = grpo_config(
        tmp_path, "rollout.teacher=tiny", "rollout.alpha=0.3", "rollout.correction.cap=3"
    )
    trainer = build_pg_trainer(cfg)
    # A teacher that differs from the policy: perturb its weights.
    with torch.no_grad():
        trainer.engine.teacher.lm_head.weight.mul_(4.0)
    trainer.train()
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if "sampling/alpha_mean" in r]
    assert records[0]["sampling/alpha_mean"] == pytest.approx(0.3)
    assert 1.0 < records[0]["sampling/is_weight_max"] <= 3.0
    assert records[0]["sampling/ess"] < 1.0


def test_an_alpha_schedule_follows_the_iterations(tmp_path):
    cfg = grpo_config(tmp_path, "rollout.teacher=tiny", "rollout.alpha=linear:0.2:0.6:1")
    trainer = build_pg_trainer(cfg)
    trainer.train()
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if "sampling/alpha_mean" in r]
    assert [r["sampling/alpha_mean"] for r in records] == pytest.approx([0.2, 0.6])


def test_bad_alpha_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown rule 'kl'"):
        grpo_config(tmp_path, "rollout.teacher=tiny", "rollout.alpha=kl")
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\], got 1\.5"):
        grpo_config(tmp_path, "rollout.teacher=tiny", "rollout.alpha=1.5")
