"""SFT with ``packing=true`` through the trainer: the same examples give the same loss as
unpacked (token-mean NLL over all completion tokens; the block-diagonal mask and restarted
positions make each packed example see only itself)."""

from __future__ import annotations

import pytest

from alignkit.config import load_config
from alignkit.tracking import read_metrics
from alignkit.trainers.sft import SFTConfig, build_sft_trainer


def first_step_loss(run_settings, tmp_path, data, name: str, *overrides: str) -> tuple[float, int]:
    cfg = load_config(
        SFTConfig,
        None,
        run_settings(
            tmp_path,
            name,
            f"data.train_file={data}",
            "examples_per_device=16",  # the whole file is one batch, packed or not
            "max_steps=1",
            "logging.every=1",
            *overrides,
        ),
    )
    trainer = build_sft_trainer(cfg)
    summary = trainer.train()
    assert summary["step"] == 1
    return read_metrics(cfg.run_dir / "metrics.jsonl")[0]["loss"], len(trainer.train_dataset)


def test_packed_sft_loss_equals_the_unpacked_loss(head_of, run_settings, tmp_path):
    data = head_of("sft_train", 16)
    plain, plain_rows = first_step_loss(run_settings, tmp_path, data, "plain", "model.name=tiny")
    packed, packed_rows = first_step_loss(
        run_settings, tmp_path, data, "packed", "model.name=tiny", "packing=true"
    )
    assert (plain_rows, packed_rows) == (16, 8)  # two examples per 128-token row
    assert packed == pytest.approx(plain, rel=1e-5)
    assert plain > 5.0  # the untrained preset: a loss far from 0, so equality means something
