"""``data.max_prompt_length`` (TRL's): each prompt keeps only its last N tokens, before
``max_length`` applies; answers are untouched."""

from __future__ import annotations

import pytest

from alignkit.config import load_config
from alignkit.data import tokenize_preferences, tokenize_sft, validate_records
from alignkit.errors import ConfigError
from alignkit.models import load_tokenizer
from alignkit.trainers.dpo import DPOConfig

PROMPT = "Please tell me, in a few careful words, how do I cook pasta for four people?"


def test_prompts_keep_their_last_tokens_and_answers_stay_whole():
    tokenizer = load_tokenizer("tiny")
    pairs = validate_records(
        [{"prompt": PROMPT, "chosen": "Boil water.", "rejected": "No."}], "preference"
    )
    full = tokenize_preferences(pairs, tokenizer)[0]
    capped = tokenize_preferences(pairs, tokenizer, max_prompt_length=5)[0]
    assert len(full["prompt_ids"]) > 5
    assert capped["prompt_ids"] == full["prompt_ids"][-5:]
    assert (capped["chosen_ids"], capped["rejected_ids"]) == (
        full["chosen_ids"],
        full["rejected_ids"],
    )

    rows = validate_records([{"prompt": PROMPT, "completion": "Boil water."}], "sft")
    sft_full = tokenize_sft(rows, tokenizer)[0]
    sft_capped = tokenize_sft(rows, tokenizer, max_prompt_length=5)[0]
    cut = len(sft_full["input_ids"]) - len(sft_capped["input_ids"])
    assert cut == len(full["prompt_ids"]) - 5
    assert sft_capped["input_ids"] == sft_full["input_ids"][cut:]


def test_the_config_key_is_validated():
    assert load_config(DPOConfig, None, ["data.max_prompt_length=64"]).data.max_prompt_length == 64
    with pytest.raises(ConfigError, match="max_prompt_length must be >= 1 or null, got 0"):
        load_config(DPOConfig, None, ["data.max_prompt_length=0"])
