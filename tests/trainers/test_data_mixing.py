"""Several train files mixed with weights (data.train_file as a list, data.train_weights)."""

from __future__ import annotations

import pytest

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.trainers.common import load_split
from alignkit.trainers.sft import SFTConfig


def test_weights_repeat_and_subsample_each_file(head_of, task_files):
    a, b = head_of("sft_train", 8), task_files["sft_heldout"]  # 8 and 96 rows
    cfg = load_config(
        SFTConfig, None, [f"data.train_file=[{a},{b}]", "data.train_weights=[2,0.25]", "seed=3"]
    )
    mixed = load_split(cfg.data, "sft", "train", cfg.seed)
    assert len(mixed) == 2 * 8 + 24
    first = load_split(load_config(SFTConfig, None, [f"data.train_file={a}"]).data, "sft", "train")
    assert mixed.records[:16] == list(first) * 2
    held_out = {r["prompt"] for r in load_split(
        load_config(SFTConfig, None, [f"data.train_file={b}"]).data, "sft", "train"
    )}  # fmt: skip
    assert {r["prompt"] for r in mixed.records[16:]} <= held_out
    again = load_split(cfg.data, "sft", "train", cfg.seed)
    assert again.records == mixed.records  # seeded
    assert mixed.source == f"{a} + {b}"


def test_a_list_without_weights_uses_every_row_once_and_mismatched_weights_are_an_error(
    head_of,
):
    a, b = head_of("sft_train", 8), head_of("sft_train", 16)
    cfg = load_config(SFTConfig, None, [f"data.train_file=[{a},{b}]"])
    assert len(load_split(cfg.data, "sft", "train")) == 24
    bad = load_config(SFTConfig, None, [f"data.train_file=[{a},{b}]", "data.train_weights=[1]"])
    with pytest.raises(ConfigError, match="1 weights for 2 train files"):
        load_split(bad.data, "sft", "train")
