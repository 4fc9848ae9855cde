"""TRL's ``{"text"}`` rows for SFT: an empty prompt, the loss on every token of the text."""

from __future__ import annotations

import json

import pytest

from alignkit.data import load_records, tokenize_sft
from alignkit.data.tokenize import IGNORE_INDEX
from alignkit.errors import DataError
from alignkit.models import load_tokenizer


def test_text_rows_train_on_every_token(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text(json.dumps({"text": "How do I cook pasta? Boil water."}) + "\n")
    records = load_records(path, "sft")
    assert (records[0]["prompt"], records[0]["completion"]) == (
        "",
        "How do I cook pasta? Boil water.",
    )
    tokenizer = load_tokenizer("tiny")
    example = tokenize_sft(records, tokenizer)[0]
    text_ids = tokenizer("How do I cook pasta? Boil water.", add_special_tokens=False)["input_ids"]
    trained = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert trained == [*text_ids, tokenizer.eos_token_id]  # the whole text, then EOS


def test_an_empty_text_row_is_reported(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=r"lm\.jsonl:1: field 'text'"):
        load_records(path, "sft")
