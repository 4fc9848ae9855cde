"""What a trainer says about its data: the length warning once, invalid rows counted as rows,
and the split of a saved multi-split `datasets` directory chosen by config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest

from alignkit.config import load_config
from alignkit.data import load_records
from alignkit.errors import DataError
from alignkit.trainers.common import load_split
from alignkit.trainers.sft import SFTConfig, build_sft_trainer


def test_the_length_warning_is_logged_once_naming_the_file_once(
    head_of, run_settings, tmp_path, caplog
):
    data = head_of("sft_train", 8)
    cfg = load_config(
        SFTConfig,
        None,
        run_settings(tmp_path, "sft", f"data.train_file={data}", "data.max_length=8"),
    )
    with caplog.at_level(logging.WARNING):
        build_sft_trainer(cfg)
    warnings = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].count(str(data)) == 1
    assert "8 of 8 rows over max_length=8 tokens were truncated" in warnings[0]


def test_rows_with_two_problems_each_are_counted_as_rows(tmp_path):
    path = tmp_path / "wrong.jsonl"
    path.write_text("".join(json.dumps({"text": "x"}) + "\n" for _ in range(3)))
    with pytest.raises(DataError) as info:
        load_records(path, "preference")
    text = str(info.value)
    problems = len(info.value.problems)
    assert problems >= 6  # prompt, chosen and rejected missing on each row
    assert text.startswith(f"3 invalid row(s) ({problems} problems; format 'preference')")


@pytest.fixture
def two_splits(tmp_path: Path) -> Path:
    row = {"prompt": "How do I cook pasta?", "completion": "Boil water."}
    splits = {"train": [row] * 3, "test": [dict(row, completion="Other.")] * 2}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    return tmp_path / "dd"


def test_a_config_key_chooses_the_split_of_a_saved_dataset_dict(two_splits):
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"data.train_file={two_splits}",
            f"data.eval_file={two_splits}",
            "data.train_split=train",
            "data.eval_split=test",
        ],
    )
    train = load_split(cfg.data, "sft", "train")
    held_out = load_split(cfg.data, "sft", "eval")
    assert (len(train), train[0]["completion"]) == (3, "Boil water.")
    assert (len(held_out), held_out[0]["completion"]) == (2, "Other.")
    unset = load_config(SFTConfig, None, [f"data.train_file={two_splits}"])
    with pytest.raises(DataError, match=r"set data\.train_split to one of: train, test"):
        load_split(unset.data, "sft", "train")
