"""Preference-data tools: ratings to pairs (seed 002 §4.2.3) and annotator agreement measures.

The seed's ``compute_agreement = 1 - std/mean`` is not an agreement measure (it depends on the
scale's origin and is undefined around a zero mean); alignkit offers the majority share and
Krippendorff's alpha instead (seeds/NOTES.md).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["krippendorff_alpha", "majority_share", "ratings_to_pairs"]


def _prompt_key(prompt: Any) -> str:
    # Conversational prompts are lists of dicts: group them by their canonical JSON.
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def ratings_to_pairs(
    rows: Iterable[Mapping[str, Any]],
    min_gap: float = 0.5,
    max_pairs_per_prompt: int | None = None,
) -> list[dict[str, Any]]:
    """Turn rating rows ``{"prompt","response","rating"}`` into preference pairs.

    Output rows are ``{"prompt","chosen","rejected","margin"}``.

    Responses to the same prompt are compared two by two; a pair is kept when the rating gap is
    at least ``min_gap`` (ratings too close say little about preference), with the higher-rated
    response as ``chosen`` and the gap as ``margin``. ``max_pairs_per_prompt`` keeps the pairs
    with the largest gaps. Prompts keep their first-seen order; within a prompt pairs go by
    decreasing gap, ties in input order, so the output is deterministic.

    Example:
        >>> rows = [{"prompt": "p", "response": "a", "rating": 5},
        ...         {"prompt": "p", "response": "b", "rating": 2},
        ...         {"prompt": "p", "response": "c", "rating": 4.8}]
        >>> [(r["chosen"], r["rejected"], r["margin"]) for r in ratings_to_pairs(rows)]
        [('a', 'b', 3.0), ('c', 'b', 2.8)]
    """
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_prompt_key(row["prompt"]), []).append(row)
    pairs: list[dict[str, Any]] = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: -float(r["rating"]))  # stable: ties keep order
        candidates = []
        for i, better in enumerate(ranked):
            for worse in ranked[i + 1 :]:
                gap = float(better["rating"]) - float(worse["rating"])
                if gap >= min_gap and gap > 0:
                    candidates.append((gap, better, worse))
        candidates.sort(key=lambda c: -c[0])
        if max_pairs_per_prompt is not None:
            candidates = candidates[:max_pairs_per_prompt]
        pairs.extend(
            {
                "prompt": better["prompt"],
                "chosen": better["response"],
                "rejected": worse["response"],
                "margin": round(gap, 10),
            }
            for gap, better, worse in candidates
        )
    return pairs


def majority_share(labels: Sequence[Hashable | None]) -> float:
    """Share of annotators who gave the most common label (missing ``None`` ignored).

    1.0 is unanimity; with k labels and n annotators the floor is 1/k. ``nan`` when no label.
    """
    present = [label for label in labels if label is not None]
    if not present:
        return float("nan")
    return Counter(present).most_common(1)[0][1] / len(present)


def krippendorff_alpha(units: Sequence[Sequence[Any]], level: str = "interval") -> float:
    """Krippendorff's alpha of ``units``: one list of annotator values per item, ``None`` missing.

    ``alpha = 1 - D_o / D_e``, the observed disagreement within items over the disagreement
    expected by chance from all pairable values, with the squared difference (``interval``) or
    inequality (``nominal``) as distance. Items with fewer than two values are not pairable and
    are ignored. 1 is perfect agreement, 0 chance level, negative systematic disagreement;
    ``nan`` when the pairable values do not vary (alpha is undefined then).

    Reference: K. Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011).

    Example:
        >>> round(krippendorff_alpha([[1, 1], [2, 2], [3, 3]], level="nominal"), 3)
        1.0
    """
    if level not in ("interval", "nominal"):
        raise ValueError(f"level must be 'interval' or 'nominal', got {level!r}")
    pairable = [[v for v in unit if v is not None] for unit in units]
    pairable = [values for values in pairable if len(values) >= 2]
    n = sum(len(values) for values in pairable)
    if n < 2:
        return float("nan")
    all_values = [v for values in pairable for v in values]

    def pair_disagreement(values: Sequence[Any]) -> float:
        # Sum over ordered pairs i != j of the distance, in closed form (no O(m^2) loop).
        if level == "nominal":
            return float(len(values) ** 2 - sum(c * c for c in Counter(values).values()))
        x = [float(v) for v in values]
        return 2.0 * (len(x) * math.fsum(v * v for v in x) - math.fsum(x) ** 2)

    observed = sum(pair_disagreement(v) / (len(v) - 1) for v in pairable) / n
    expected = pair_disagreement(all_values) / (n * (n - 1))
    if expected == 0:
        return float("nan")
    return 1.0 - observed / expected
