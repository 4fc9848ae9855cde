"""The ``dpo-small`` data: preference pairs of realistic lengths built from the synthetic task.

The synthetic task's own rows are short (a 10-token prompt, 15-35-token answers), far from the
100-250-token rows of real preference data, where padding and the LM head decide the speed. So
each bench pair joins several consecutive synthetic rows: a prompt of 1-3 of the task's
prompts, a chosen answer of 3-6 chosen answers and a rejected answer of 5-10 rejected answers
(counts drawn with the seed, independently; rejected answers are half as long), separated by blank lines. Measured with
SmolLM2's tokenizer at max length 256 and 4 pairs per step (the first 96 pairs): rows of 151
tokens on average, 24.5% of a padded batch's positions padding, the prompts 14.3% of the real
tokens (the issue's measurement: 26% and 15.6%).
"""

from __future__ import annotations

import random
from typing import Any


def small_pairs(n_pairs: int, seed: int = 0) -> tuple[list[dict[str, str]], str]:
    """``n_pairs`` joined pairs (see the module docstring) and how they were made."""
    from alignkit.data.synthetic import SyntheticTask

    rows = SyntheticTask(seed=seed).preference_rows("train")
    rng = random.Random(seed)
    pairs: list[dict[str, Any]] = []
    cursor = 0
    for _ in range(n_pairs):
        counts = (rng.randint(1, 3), rng.randint(3, 6), rng.randint(5, 10))
        parts = dict(zip(("prompt", "chosen", "rejected"), counts, strict=True))
        pair = {}
        for key, count in parts.items():
            pair[key] = "\n\n".join(rows[(cursor + k) % len(rows)][key] for k in range(count))
        cursor += max(parts.values())
        pairs.append(pair)
    how = (
        f"SyntheticTask(seed={seed}).preference_rows('train') joined: per pair 1-3 prompts, "
        "3-6 chosen and 5-10 rejected answers of consecutive rows (bench/dpo_small.py)"
    )
    return pairs, how
