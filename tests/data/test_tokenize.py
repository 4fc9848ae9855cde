"""Tokenisation: exact prompt/answer boundary, label masking, chat rendering, length policies."""

from __future__ import annotations

import copy
import json
import logging
from unittest import mock

import pytest
from transformers import PreTrainedTokenizerFast

from alignkit.data import (
    IGNORE_INDEX,
    SyntheticTask,
    load_records,
    render_prompt,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
    validate_records,
)
from alignkit.errors import DataError, ModelError


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_sft_labels_mask_exactly_the_prompt(tokenizer):
    rows = SyntheticTask(seed=0).sft_rows("train")[:40]
    data = tokenize_sft(rows, tokenizer)
    assert len(data) == len(rows) and data.report.n_over_limit == 0
    eos = tokenizer.eos_token_id
    for row, example in zip(rows, data, strict=True):
        prompt, completion = ids(tokenizer, row["prompt"]), ids(tokenizer, row["completion"])
        assert example["input_ids"] == prompt + completion + [eos]
        assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [eos]


def test_plain_prompts_get_the_tokenizers_prefix_but_no_eos_before_the_answer(bos_tokenizer):
    data = tokenize_sft([{"prompt": "How do I cook pasta?", "completion": "Sure."}], bos_tokenizer)
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    prompt, answer = ids(bos_tokenizer, "How do I cook pasta?"), ids(bos_tokenizer, "Sure.")
    assert data[0]["input_ids"] == [bos, *prompt, *answer, eos]
    assert data[0]["labels"][: len(prompt) + 1] == [IGNORE_INDEX] * (len(prompt) + 1)


def test_messages_use_the_chat_template_or_the_plain_fallback(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert render_prompt(tokenizer, "as is") == "as is"
    assert render_prompt(tokenizer, messages) == "system: Be brief.\nuser: Hi?\nassistant: "
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert render_prompt(templated, messages) == "[system] Be brief. [user] Hi? [assistant]"
    example = tokenize_sft([{"prompt": messages, "completion": "Sure."}], templated)[0]
    rendered = ids(templated, "[system] Be brief. [user] Hi? [assistant]")
    assert example["input_ids"][: len(rendered)] == rendered


def test_bos_goes_before_plain_prompts_but_not_before_templated_ones(bos_tokenizer):
    messages = [{"role": "user", "content": "Hi?"}]
    bos = bos_tokenizer.bos_token_id
    fallback = tokenize_prompts([{"prompt": messages}], bos_tokenizer)[0]["input_ids"]
    assert fallback == [bos, *ids(bos_tokenizer, "user: Hi?\nassistant: ")]
    templated = copy.deepcopy(bos_tokenizer)
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert tokenize_prompts([{"prompt": messages}], templated)[0]["input_ids"][0] != bos


def test_truncate_keeps_the_end_of_the_prompt(tokenizer):
    row = {
        "prompt": "How do I cook pasta? Please explain how to bake bread.",
        "completion": "Sure.",
    }
    prompt, answer = ids(tokenizer, row["prompt"]), ids(tokenizer, row["completion"])
    answer = [*answer, tokenizer.eos_token_id]
    limit = len(answer) + 4
    data = tokenize_sft(validate_records([row], "sft"), tokenizer, max_length=limit)
    assert data[0]["input_ids"] == prompt[-4:] + answer
    assert data[0]["labels"] == [IGNORE_INDEX] * 4 + answer
    assert data.report.over_limit_rows == [1] and data.report.policy == "truncate"


def test_truncate_cuts_the_answer_end_when_the_answer_alone_is_too_long(tokenizer):
    row = {"prompt": "How do I cook pasta?", "completion": "first boil salted water then drain it"}
    prompt, answer = ids(tokenizer, row["prompt"]), ids(tokenizer, row["completion"])
    example = tokenize_sft([row], tokenizer, max_length=5)[0]
    assert example["input_ids"] == [prompt[-1], *answer[:4]]  # last prompt token kept, no EOS
    assert example["labels"] == [IGNORE_INDEX, *answer[:4]]


def test_drop_and_error_policies_name_the_source_rows(tokenizer, tmp_path):
    rows = SyntheticTask(seed=0).sft_rows("train")[:12]
    rows[3] = dict(rows[3], completion=" ".join(["sure"] * 60))
    rows[8] = dict(rows[8], completion=" ".join(["water"] * 70))
    path = tmp_path / "sft.jsonl"
    path.write_text("\n\n".join(json.dumps(r) for r in rows))  # blank lines: record i on line 2i-1
    records = load_records(path, "sft")
    kept = tokenize_sft(records, tokenizer, max_length=48, policy="drop")
    assert len(kept) == 10
    assert kept.report.over_limit_rows == [7, 17] and kept.report.n_rows == 12
    assert (
        "2 of 12 rows over max_length=48 tokens were dropped (rows 7, 17)" in kept.report.summary()
    )
    with pytest.raises(DataError) as info:
        tokenize_sft(records, tokenizer, max_length=48, policy="error")
    assert [(p.row, p.field) for p in info.value.problems] == [
        (7, "prompt+completion"),
        (17, "prompt+completion"),
    ]
    assert "> max_length=48" in str(info.value) and info.value.exit_code == 2


def test_rows_over_the_limit_are_logged(tokenizer, caplog):
    rows = [{"prompt": "How do I cook pasta?", "completion": "Sure."}] * 3
    with caplog.at_level(logging.WARNING, logger="alignkit.data"):
        tokenize_sft(rows, tokenizer, max_length=4)
    assert "3 of 3 rows over max_length=4 tokens were truncated" in caplog.text


def test_preference_examples_carry_extras_and_share_the_answer_budget(tokenizer):
    rows = SyntheticTask(seed=0).safety_preference_rows("train")[:20]
    records = validate_records(rows, "safety_preference")
    data = tokenize_preferences(records, tokenizer)
    first, record = data[0], records[0]
    assert first["prompt_ids"] == ids(tokenizer, record["prompt"])
    assert first["chosen_ids"] == [*ids(tokenizer, record["chosen"]), tokenizer.eos_token_id]
    assert first["rejected_ids"] == [*ids(tokenizer, record["rejected"]), tokenizer.eos_token_id]
    extras = {"chosen_safety", "rejected_safety", "chosen_is_safe", "rejected_is_safe"}
    assert set(first) == {"prompt_ids", "chosen_ids", "rejected_ids", *extras}
    assert first["chosen_safety"] == record["chosen_safety"]

    pair = {"prompt": "How do I cook pasta?", "chosen": "Sure, boil water.", "rejected": "No."}
    short = tokenize_preferences([pair], tokenizer, max_length=6)[0]
    assert len(short["prompt_ids"]) + len(short["chosen_ids"]) == 6
    assert short["rejected_ids"] == [*ids(tokenizer, "No."), tokenizer.eos_token_id]
    assert short["prompt_ids"] == ids(tokenizer, pair["prompt"])[-1:]
    with pytest.raises(DataError, match="margin"):
        tokenize_preferences([pair], tokenizer, extra_fields=["margin"])


def test_prompt_examples_keep_the_end_when_truncated(tokenizer):
    rows = [{"prompt": "How do I cook pasta?"}, {"prompt": "Hi"}]
    data = tokenize_prompts(rows, tokenizer, max_length=3)
    assert data[0]["input_ids"] == ids(tokenizer, "How do I cook pasta?")[-3:]
    assert data.report.over_limit_rows == [1]
    assert len(tokenize_prompts(rows, tokenizer, max_length=3, policy="drop")) == 1


def test_texts_are_tokenized_in_batches_not_row_by_row(tokenizer):
    fresh = copy.deepcopy(tokenizer)
    rows = SyntheticTask(seed=0).sft_rows("train")
    original = PreTrainedTokenizerFast.__call__
    with mock.patch.object(
        PreTrainedTokenizerFast, "__call__", autospec=True, side_effect=original
    ) as call:
        tokenize_sft(rows, fresh)
    assert len(rows) > 200 and call.call_count <= 4  # 2 probes + prompts + completions


def test_bad_arguments_and_missing_eos_are_reported(tokenizer):
    rows = [{"prompt": "a", "completion": "b"}]
    with pytest.raises(ValueError, match="policy"):
        tokenize_sft(rows, tokenizer, max_length=8, policy="cut")
    with pytest.raises(ValueError, match="at least 2"):
        tokenize_sft(rows, tokenizer, max_length=1)
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ModelError, match="EOS"):
        tokenize_sft(rows, no_eos)
