"""Train / validation / test split by prompt: no prompt in two splits, seeded, stratified.

All rows of one prompt go to the same split, so a model is never evaluated on a prompt it was
trained on. With a category column, each category's prompts are split in the same proportions
(a prompt's category is its first row's). Within a stratum the prompts are shuffled by the
seed and cut at ``round(n * (1 - validation - test))`` and ``round(n * (1 - test))``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from typing import Any

__all__ = ["SPLITS", "split_by_prompt"]

SPLITS = ("train", "validation", "test")


def _key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def split_by_prompt(
    rows: list[dict[str, Any]],
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    category_field: str | None = "category",
) -> dict[str, list[dict[str, Any]]]:
    """Split ``rows`` (each with a ``prompt``) into ``SPLITS``, keeping the file order within each.

    ``category_field`` stratifies when at least one row has it (``None`` turns it off).
    """
    if validation < 0 or test < 0 or validation + test >= 1:
        raise ValueError(
            f"need validation, test >= 0 and validation + test < 1, got {validation}, {test}"
        )
    prompts: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        prompts[_key(row["prompt"])].append(i)
    stratify = category_field is not None and any(category_field in row for row in rows)
    strata: dict[str, list[str]] = defaultdict(list)
    for prompt, members in prompts.items():
        category = rows[members[0]].get(category_field) if stratify else None
        strata[_key(category) if category is not None else ""].append(prompt)
    assignment: dict[str, str] = {}
    rng = random.Random(seed)
    for name in sorted(strata):
        members = strata[name][:]
        rng.shuffle(members)
        n = len(members)
        cut_train = round(n * (1 - validation - test))
        cut_validation = round(n * (1 - test))
        for j, prompt in enumerate(members):
            assignment[prompt] = (
                "train" if j < cut_train else "validation" if j < cut_validation else "test"
            )
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for row in rows:
        out[assignment[_key(row["prompt"])]].append(row)
    return out
