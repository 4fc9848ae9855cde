"""Collators: padding side, masks, chosen-then-rejected order, passthrough fields, doc examples."""

from __future__ import annotations

import doctest

import torch

from alignkit.data import (
    IGNORE_INDEX,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    SyntheticTask,
    tokenize_preferences,
    tokenize_sft,
    validate_records,
)
from alignkit.data import collate as collate_module


def test_docstring_examples_run():
    result = doctest.testmod(collate_module)
    assert result.attempted >= 10 and result.failed == 0


def test_sft_collator_right_pads_and_masks_labels(tokenizer):
    data = tokenize_sft(SyntheticTask(seed=0).sft_rows("train")[:5], tokenizer)
    pad = tokenizer.pad_token_id
    batch = SFTCollator(pad_token_id=pad, pad_to_multiple_of=8)(list(data))
    lengths = [len(e["input_ids"]) for e in data]
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["labels"].shape == (5, width)
    assert width % 8 == 0 and max(lengths) <= width < max(lengths) + 8
    for i, example in enumerate(data):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == example["input_ids"]
        assert batch["labels"][i, :n].tolist() == example["labels"]
        assert (batch["input_ids"][i, n:] == pad).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_preference_collator_stacks_chosen_then_rejected_with_response_masks(tokenizer):
    rows = SyntheticTask(seed=0).preference_rows("train")[:4]
    data = tokenize_preferences(validate_records(rows, "preference"), tokenizer)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(list(data))
    n_pairs = len(data)
    assert batch["input_ids"].shape[0] == 2 * n_pairs
    assert batch["response_mask"].shape == batch["input_ids"].shape
    for i, example in enumerate(data):
        for row, answer in ((i, example["chosen_ids"]), (n_pairs + i, example["rejected_ids"])):
            full = example["prompt_ids"] + answer
            assert batch["input_ids"][row, : len(full)].tolist() == full
            assert batch["attention_mask"][row].sum() == len(full)
            mask = batch["response_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == answer
            assert not mask[: len(example["prompt_ids"])].any()
    assert torch.equal(batch["margin"], torch.tensor([r["margin"] for r in rows]))
    assert batch["margin"].dtype == torch.float32


def test_preference_collator_passes_safety_fields_as_tensors(tokenizer):
    rows = SyntheticTask(seed=0).safety_preference_rows("train")[:6]
    data = tokenize_preferences(validate_records(rows, "safety_preference"), tokenizer)
    batch = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=16)(list(data))
    assert batch["input_ids"].shape[1] % 16 == 0
    assert batch["chosen_is_safe"].dtype == torch.bool and batch["chosen_is_safe"].shape == (6,)
    assert batch["chosen_safety"].dtype == torch.float32
    delta_s = batch["chosen_safety"] - batch["rejected_safety"]
    assert delta_s.shape == (6,)


def test_prompt_collator_left_pads_so_generation_continues_every_prompt():
    examples = [{"input_ids": [4, 5, 6, 7], "text": "a"}, {"input_ids": [8, 9], "text": "b"}]
    batch = PromptCollator(pad_token_id=1, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].tolist() == [[1, 1, 1, 1, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1, 8, 9]]
    assert batch["attention_mask"].tolist() == [[0] * 4 + [1] * 4, [0] * 6 + [1] * 2]
    assert batch["text"] == ["a", "b"]  # non-numeric fields pass through as lists


def test_index_field_passes_through_for_cached_reference_logprobs():
    examples = [
        {"prompt_ids": [3], "chosen_ids": [4], "rejected_ids": [5, 6], "index": 7},
        {"prompt_ids": [3, 3], "chosen_ids": [4], "rejected_ids": [5], "index": 2},
    ]
    batch = PreferenceCollator(pad_token_id=0)(examples)
    assert batch["index"].tolist() == [7, 2] and batch["index"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[3, 4, 0], [3, 3, 4], [3, 5, 6], [3, 3, 5]]
