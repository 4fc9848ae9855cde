"""Resuming with other settings: refused with the list of differences unless each changed key
is allowed by name; an allowed change is applied fully from the resumed step and recorded in
config.yaml with that step. The written config describes the run, not the resuming command."""

from __future__ import annotations

import pytest
import yaml

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.tracking import read_metrics
from alignkit.trainers.sft import SFTConfig, build_sft_trainer


def sft(run_settings, tmp_path, data, *overrides: str) -> SFTConfig:
    return load_config(
        SFTConfig,
        None,
        run_settings(
            tmp_path,
            "sft",
            "model.name=tiny",
            f"data.train_file={data}",
            "examples_per_device=4",
            "optim.lr=1e-3",
            "optim.schedule=constant",
            "optim.warmup_ratio=0",
            "checkpoint.every=1",
            "logging.every=1",
            *overrides,
        ),
    )


@pytest.fixture
def first_run(head_of, run_settings, tmp_path):
    data = head_of("sft_train", 8)
    cfg = sft(run_settings, tmp_path, data, "max_steps=2")
    build_sft_trainer(cfg).train()
    return data, cfg


def resume(run_settings, tmp_path, data, run_dir, *overrides):
    cfg = sft(run_settings, tmp_path, data, f"resume_from={run_dir}", *overrides)
    return build_sft_trainer(cfg).train()


def test_a_resumed_runs_config_yaml_does_not_store_resume_from(first_run, run_settings, tmp_path):
    data, cfg = first_run
    resume(run_settings, tmp_path, data, cfg.run_dir, "max_steps=3")
    written = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert written["resume_from"] is None and written["max_steps"] == 3
    reused = load_config(SFTConfig, cfg.run_dir / "config.yaml", ["run_name=other"])
    assert reused.run_dir == tmp_path / "other"  # a new run, not a continuation of sft


def test_a_changed_setting_on_resume_is_refused_with_the_differences(
    first_run, run_settings, tmp_path
):
    data, cfg = first_run
    with pytest.raises(ConfigError) as info:
        resume(run_settings, tmp_path, data, cfg.run_dir, "max_steps=3", "optim.lr=5e-4",
               "optim.schedule=cosine")  # fmt: skip
    message = str(info.value)
    assert "optim.lr: 0.001 -> 0.0005" in message
    assert "optim.schedule: constant -> cosine" in message
    assert "allow_change" in message and "--allow-change" in message
    assert "max_steps" not in message  # extending a run is what resuming is for


def test_an_allowed_lr_change_is_applied_fully_and_recorded_with_its_step(
    first_run, run_settings, tmp_path
):
    data, cfg = first_run
    resume(
        run_settings, tmp_path, data, cfg.run_dir, "max_steps=4", "optim.lr=5e-4",
        "allow_change=[optim.lr]",
    )  # fmt: skip
    lrs = [r["lr"] for r in read_metrics(cfg.run_dir / "metrics.jsonl")]
    assert lrs == [1e-3, 1e-3, 5e-4, 5e-4]  # constant schedule: the new peak from step 3
    written = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert written["optim"]["lr"] == 5e-4
    assert written["_changes"] == [{"step": 2, "key": "optim.lr", "from": 1e-3, "to": 5e-4}]
    assert written["allow_change"] == []


def test_the_cli_allow_change_option(first_run, tmp_path, capsys):
    _, cfg = first_run
    args = ["train", "sft", "--resume", str(cfg.run_dir), "max_steps=3", "optim.lr=5e-4"]
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2
    assert "optim.lr: 0.001 -> 0.0005" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main([*args, "--allow-change", "optim.lr"])
    assert done.value.code in (0, None)
    assert read_metrics(cfg.run_dir / "metrics.jsonl")[-1]["lr"] == 5e-4


def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(first_run, run_settings, tmp_path):
    data, cfg = first_run
    older = cfg.run_dir / "checkpoints" / "step-1"
    resume(run_settings, tmp_path, data, older, "max_steps=2")
    moved = sorted((cfg.run_dir / "abandoned").glob("*/step-2"))
    assert len(moved) == 1 and (moved[0] / "trainer_state.pt").is_file()
    assert moved[0].parent.name.startswith("before-resume-at-step-1-")
    assert (cfg.run_dir / "checkpoints" / "step-2" / "trainer_state.pt").is_file()  # re-made
