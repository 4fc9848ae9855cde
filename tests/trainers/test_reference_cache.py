"""The DPO reference log-prob cache is keyed on what determines its values.

A cache left in a run directory (a run stopped after its reference pass, or rerun with
``overwrite=true``) is reused only for the same reference weights, dtype, tokenizer, data,
max length and reference setting; anything else recomputes it, so the first step's loss is
exactly log 2 (policy = reference) whatever ran there before.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from alignkit.config import load_config
from alignkit.models import load_policy
from alignkit.models.forward import response_logps
from alignkit.tracking import read_metrics
from alignkit.trainers.common import split_pairs
from alignkit.trainers.dpo import REFERENCE_CACHE, DPOConfig, build_dpo_trainer


def config(run_settings, tmp_path: Path, model: Path | str, data: Path, *overrides: str):
    return load_config(
        DPOConfig,
        None,
        run_settings(
            tmp_path,
            "dpo",
            f"model.name={model}",
            f"data.train_file={data}",
            "examples_per_device=8",
            "max_steps=1",
            "logging.every=1",
            *overrides,
        ),
    )


def first_loss(cfg: DPOConfig) -> float:
    return read_metrics(cfg.run_dir / "metrics.jsonl")[0]["loss"]


def stopped_after_reference_pass(cfg: DPOConfig) -> None:
    """What a run killed between its reference pass and its first logged step leaves."""
    (cfg.run_dir / "metrics.jsonl").unlink()
    shutil.rmtree(cfg.run_dir / "checkpoints")
    assert (cfg.run_dir / REFERENCE_CACHE).is_file()


@pytest.fixture
def untrained_model(tmp_path: Path) -> Path:
    """The tiny preset before SFT, saved as a directory (same tokenizer as the SFT model)."""
    model, tokenizer = load_policy("tiny", seed=0)
    path = tmp_path / "untrained"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_another_model_at_the_same_path_recomputes_the_cache(
    sft_run, untrained_model, head_of, run_settings, tmp_path, reference_passes
):
    path = tmp_path / "policy"
    shutil.copytree(untrained_model, path)
    data = head_of("preference_train", 16)
    first = config(run_settings, tmp_path, path, data)
    build_dpo_trainer(first).train()
    stopped_after_reference_pass(first)
    # Retrain "the SFT model" behind the same path.
    shutil.rmtree(path)
    shutil.copytree(sft_run.model_dir, path)
    second = config(run_settings, tmp_path, path, data)
    build_dpo_trainer(second).train()
    assert reference_passes == [16, 16]
    assert first_loss(second) == pytest.approx(math.log(2), rel=1e-5)


def test_overwrite_clears_the_cache_and_step_one_loss_is_log_2(
    sft_run, untrained_model, head_of, run_settings, tmp_path, reference_passes
):
    path = tmp_path / "policy"
    shutil.copytree(untrained_model, path)
    data = head_of("preference_train", 16)
    build_dpo_trainer(config(run_settings, tmp_path, path, data)).train()
    shutil.rmtree(path)
    shutil.copytree(sft_run.model_dir, path)
    again = config(run_settings, tmp_path, path, data, "overwrite=true")
    build_dpo_trainer(again).train()
    assert reference_passes == [16, 16]
    assert first_loss(again) == pytest.approx(math.log(2), rel=1e-5)


def test_the_same_setup_reuses_the_cache(
    sft_run, head_of, run_settings, tmp_path, reference_passes, capsys
):
    data = head_of("preference_train", 16)
    first = config(run_settings, tmp_path, sft_run.model_dir, data)
    build_dpo_trainer(first).train()
    assert "reference log-probs: computed" in capsys.readouterr().out
    stopped_after_reference_pass(first)
    build_dpo_trainer(config(run_settings, tmp_path, sft_run.model_dir, data)).train()
    assert reference_passes == [16]
    assert "reference log-probs: reused" in capsys.readouterr().out


def test_other_data_recomputes_the_cache(
    sft_run, head_of, run_settings, tmp_path, reference_passes
):
    first = config(run_settings, tmp_path, sft_run.model_dir, head_of("preference_train", 16))
    build_dpo_trainer(first).train()
    stopped_after_reference_pass(first)
    other = config(run_settings, tmp_path, sft_run.model_dir, head_of("preference_train", 24))
    build_dpo_trainer(other).train()
    assert reference_passes == [16, 24]
    cache = torch.load(other.run_dir / REFERENCE_CACHE, weights_only=True)
    assert cache["tables"]["train"].shape == (24, 2)
    assert first_loss(other) == pytest.approx(math.log(2), rel=1e-5)


@pytest.mark.parametrize(
    "setting", ["model.dtype=bfloat16", "precision=bf16", "data.max_length=24"]
)
def test_other_dtype_or_max_length_recomputes_the_cache(
    setting, sft_run, head_of, run_settings, tmp_path, reference_passes
):
    data = head_of("preference_train", 16)
    first = config(run_settings, tmp_path, sft_run.model_dir, data)
    build_dpo_trainer(first).train()
    stopped_after_reference_pass(first)
    other = config(run_settings, tmp_path, sft_run.model_dir, data, setting)
    build_dpo_trainer(other).train()
    assert reference_passes == [16, 16]
    # bfloat16 log-probs of ~30-token responses differ from float32 ones by ~0.1 nats.
    assert first_loss(other) == pytest.approx(
        math.log(2), rel=1e-5 if "max_length" in setting else 1e-2
    )


def test_a_separate_reference_model_caches_that_models_logps(
    sft_run, untrained_model, head_of, run_settings, tmp_path
):
    cfg = config(
        run_settings,
        tmp_path,
        sft_run.model_dir,
        head_of("preference_train", 16),
        f"reference={untrained_model}",
    )
    trainer = build_dpo_trainer(cfg)
    trainer.train()
    cache = torch.load(cfg.run_dir / REFERENCE_CACHE, weights_only=True)
    reference, _ = load_policy(untrained_model)
    policy, _ = load_policy(sft_run.model_dir)
    batch = trainer.collate_fn([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        expected = torch.stack(split_pairs(response_logps(reference, batch)), -1)
        of_policy = torch.stack(split_pairs(response_logps(policy, batch)), -1)
    torch.testing.assert_close(cache["tables"]["train"][:8], expected, rtol=1e-5, atol=1e-4)
    # The two models differ by far more than the tolerance (the SFT model fits the answers).
    assert (expected - of_policy).abs().mean() > 5.0


def test_overwrite_recomputes_even_for_the_same_setup(
    sft_run, head_of, run_settings, tmp_path, reference_passes
):
    data = head_of("preference_train", 16)
    build_dpo_trainer(config(run_settings, tmp_path, sft_run.model_dir, data)).train()
    again = config(run_settings, tmp_path, sft_run.model_dir, data, "overwrite=true")
    build_dpo_trainer(again).train()
    assert reference_passes == [16, 16]  # overwrite starts the run afresh, its cache too
