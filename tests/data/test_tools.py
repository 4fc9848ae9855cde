"""Preference tools: ratings to pairs (seed 002 §4.2.3) and agreement measures (NOTES.md)."""

from __future__ import annotations

import doctest
import math

import pytest

from alignkit.data import krippendorff_alpha, majority_share, ratings_to_pairs
from alignkit.data import tools as tools_module

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 coders x 12 units.
CODERS = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]
UNITS = [list(values) for values in zip(*CODERS, strict=True)]


def test_krippendorff_alpha_matches_the_published_example():
    assert krippendorff_alpha(UNITS, level="nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(UNITS, level="interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_alpha_edge_cases():
    assert krippendorff_alpha([[1, 1], [2, 2]]) == 1.0
    assert krippendorff_alpha([[1, 2], [2, 1]]) < 0  # systematic disagreement
    assert math.isnan(krippendorff_alpha([[3, 3], [3, 3]]))  # no variation: undefined
    assert math.isnan(krippendorff_alpha([[1], [2, None]]))  # nothing pairable
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha(UNITS, level="ratio")


def test_majority_share():
    assert majority_share(["a", "a", "b", None]) == pytest.approx(2 / 3)
    assert majority_share([1, 1, 1]) == 1.0
    assert math.isnan(majority_share([None]))


def test_ratings_to_pairs_keeps_gaps_of_at_least_min_gap_best_first():
    rows = [
        {"prompt": "p", "response": "a", "rating": 3.0},
        {"prompt": "q", "response": "x", "rating": 1},
        {"prompt": "p", "response": "b", "rating": 5.0},
        {"prompt": "p", "response": "c", "rating": 2.6},
        {"prompt": "q", "response": "y", "rating": 1.5},
        {"prompt": "q", "response": "z", "rating": 1.5},  # tie: never a pair
    ]
    pairs = ratings_to_pairs(rows, min_gap=0.5)
    summary = [(p["prompt"], p["chosen"], p["rejected"], p["margin"]) for p in pairs]
    assert summary == [
        ("p", "b", "c", 2.4),
        ("p", "b", "a", 2.0),
        ("q", "y", "x", 0.5),
        ("q", "z", "x", 0.5),
    ]
    assert len(ratings_to_pairs(rows, min_gap=0.5, max_pairs_per_prompt=1)) == 2
    assert ratings_to_pairs(rows, min_gap=3.0) == []
    with pytest.raises(ValueError, match="min_gap must be >= 0, got -1"):
        ratings_to_pairs(rows, min_gap=-1)


def test_ratings_to_pairs_groups_conversational_prompts():
    chat = [{"role": "user", "content": "hi"}]
    rows = [
        {"prompt": chat, "response": "hello", "rating": 4},
        {"prompt": [dict(chat[0])], "response": "go away", "rating": 1},
    ]
    [pair] = ratings_to_pairs(rows)
    assert pair["prompt"] == chat and pair["chosen"] == "hello" and pair["margin"] == 3.0


def test_docstring_examples_run():
    result = doctest.testmod(tools_module)
    assert result.attempted >= 2 and result.failed == 0
