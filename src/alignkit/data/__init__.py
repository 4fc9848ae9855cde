"""Data: record formats, loaders and validation, preference tools, tokenisation, collators, and
the synthetic "assistant safety" task.

Typical use::

    records = load_records("pairs.jsonl", "preference")        # DataError lists bad rows
    data = tokenize_preferences(records, tokenizer, max_length=512)
    print(data.report.summary())                               # rows over the length limit
    batch = PreferenceCollator(tokenizer.pad_token_id)(data[:8])

The collators need torch; they are imported on first use, so ``alignkit.data.synthetic`` and
the loaders stay light to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alignkit.data.formats import FORMATS, ROLES, normalize_row
from alignkit.data.loaders import (
    DEFAULT_MAX_PROBLEMS,
    RecordSet,
    file_kind,
    load_records,
    read_rows,
    validate_records,
)
from alignkit.data.synthetic import (
    SyntheticTask,
    corpus,
    helpfulness_score,
    safety_cost,
    score_responses,
    write_task,
)
from alignkit.data.tokenize import (
    IGNORE_INDEX,
    LENGTH_POLICIES,
    LengthReport,
    TokenizedData,
    render_prompt,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from alignkit.data.tools import krippendorff_alpha, majority_share, ratings_to_pairs

if TYPE_CHECKING:
    from alignkit.data.collate import PreferenceCollator, PromptCollator, SFTCollator

_LAZY = {"PreferenceCollator", "PromptCollator", "SFTCollator"}

__all__ = [
    "DEFAULT_MAX_PROBLEMS",
    "FORMATS",
    "IGNORE_INDEX",
    "LENGTH_POLICIES",
    "ROLES",
    "LengthReport",
    "PreferenceCollator",
    "PromptCollator",
    "RecordSet",
    "SFTCollator",
    "SyntheticTask",
    "TokenizedData",
    "corpus",
    "file_kind",
    "helpfulness_score",
    "krippendorff_alpha",
    "load_records",
    "majority_share",
    "normalize_row",
    "ratings_to_pairs",
    "read_rows",
    "render_prompt",
    "safety_cost",
    "score_responses",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
    "validate_records",
    "write_task",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from alignkit.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module 'alignkit.data' has no attribute {name!r}")
