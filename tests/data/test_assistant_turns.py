"""Multi-turn SFT: which assistant turns of a ``{"messages"}`` conversation carry labels."""

from __future__ import annotations

import pytest

from alignkit.config import load_config
from alignkit.data.formats import normalize_row
from alignkit.data.tokenize import IGNORE_INDEX, tokenize_sft
from alignkit.errors import ConfigError
from alignkit.models.tiny import load_tiny_tokenizer
from alignkit.trainers.sft import SFTConfig

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "And of grass?"},
    {"role": "assistant", "content": "green"},
]


@pytest.fixture(scope="module")
def tiny():
    return load_tiny_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenized(tokenizer, assistant_turns: str) -> dict:
    record, problems = normalize_row({"messages": CONVERSATION}, "sft")
    assert problems == []
    return tokenize_sft([record], tokenizer, assistant_turns=assistant_turns)[0]


def _labelled_runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled positions, as their label ids."""
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return [*runs, current] if current else runs


def test_all_turns_label_exactly_both_assistant_turns(tiny):
    example = _tokenized(tiny, "all")
    # The tiny template renders an assistant turn as "<|assistant|>\n" + content + EOS; the
    # role header is masked, the content and its EOS are trained on.
    turn = [*_ids(tiny, "blue"), tiny.eos_token_id]
    final = [*_ids(tiny, "green"), tiny.eos_token_id]
    assert _labelled_runs(example["labels"]) == [turn, final]
    # The input is the whole rendered conversation, and labels equal it where they are set.
    rendered = tiny.apply_chat_template(CONVERSATION, tokenize=False)
    assert tiny.decode(example["input_ids"]) == rendered
    assert all(
        label in (IGNORE_INDEX, token)
        for label, token in zip(example["labels"], example["input_ids"], strict=True)
    )
    assert sum(label != IGNORE_INDEX for label in example["labels"]) == len(turn) + len(final)


def test_last_turn_only_labels_the_final_answer(tiny):
    example = _tokenized(tiny, "last")
    assert _labelled_runs(example["labels"]) == [[*_ids(tiny, "green"), tiny.eos_token_id]]
    # Same tokens either way: only the labels differ.
    assert example["input_ids"] == _tokenized(tiny, "all")["input_ids"]


def test_assistant_turns_is_checked():
    with pytest.raises(ValueError, match="assistant_turns must be one of"):
        tokenize_sft([], load_tiny_tokenizer(), assistant_turns="first")
    with pytest.raises(ConfigError, match="assistant_turns"):
        load_config(SFTConfig, None, ["data.assistant_turns=first"])
    assert load_config(SFTConfig, None, []).data.assistant_turns == "all"
