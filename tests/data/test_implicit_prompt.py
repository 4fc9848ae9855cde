"""Preference rows without ``prompt`` (TRL's implicit prompt): the shared prefix of chosen and
rejected is the prompt."""

from __future__ import annotations

import pytest

from alignkit.data import validate_records
from alignkit.errors import DataError


def test_text_rows_split_at_the_shared_prefix_keeping_the_space_with_the_answers():
    rows = [{"chosen": "Q: how? A: Boil water.", "rejected": "Q: how? A: No."}]
    record = validate_records(rows, "preference")[0]
    assert record == {"prompt": "Q: how? A:", "chosen": " Boil water.", "rejected": " No."}


def test_message_rows_take_the_shared_messages_as_the_prompt():
    user = {"role": "user", "content": "How do I cook pasta?"}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "Boil water."}],
            "rejected": [user, {"role": "assistant", "content": "No."}],
        }
    ]
    record = validate_records(rows, "preference")[0]
    assert record == {"prompt": [user], "chosen": "Boil water.", "rejected": "No."}


def test_rows_without_a_shared_prefix_are_reported():
    with pytest.raises(DataError, match=r"<records>:1: field 'prompt': missing field, and chosen"):
        validate_records([{"chosen": "Yes.", "rejected": "No."}], "preference")


def test_an_explicit_prompt_is_used_as_given():
    rows = [{"prompt": "Q", "chosen": "Q A", "rejected": "Q B"}]
    assert validate_records(rows, "preference")[0]["chosen"] == "Q A"
