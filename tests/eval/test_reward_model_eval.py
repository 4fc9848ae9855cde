"""evaluate_reward_model on planted scorers: each metric against its exact value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignkit.eval.reward_model import evaluate_reward_model, pairs_from_records


class _Planted:
    """A one- or two-member 'ensemble' whose score (reward or cost) is ``scale * len(text)``."""

    def __init__(self, scale: float = 1.0, kind: str = "reward", members: int = 1) -> None:
        self.scale, self.kind, self.k = scale, kind, members
        self.name, self.names = "planted", [f"m{i}" for i in range(members)]

    def __len__(self) -> int:
        return self.k

    def score_with_members(self, prompts: list, responses: list[str]) -> tuple:
        lengths = torch.tensor([float(len(r.strip().lower())) for r in responses])
        members = torch.stack([self.scale * lengths * (1 + 0.1 * i) for i in range(self.k)])
        return members.mean(0), members


def _preference(n: int = 20) -> list[dict]:
    # chosen is longer in all but the last 5 pairs; the last 2 are ties in length
    rows = []
    for i in range(n):
        chosen = "x" * (10 + i) if i < n - 5 else "y" * 5
        rejected = "z" * 5 if i < n - 2 else "w" * 5
        rows.append({"prompt": f"p{i}", "chosen": chosen, "rejected": rejected, "margin": float(i)})
    return rows


def test_accuracy_ties_half_buckets_and_plots(tmp_path: Path) -> None:
    pairs = pairs_from_records(_preference(), "preference", "reward", "d")
    report = evaluate_reward_model(_Planted(), pairs, tmp_path)
    # pairs 0..14: chosen longer (right); 15..19: both 5 characters long (ties, half each)
    assert report["accuracy"] == pytest.approx((15 + 0.5 * 5) / 20)
    buckets = report["accuracy_by_margin"]
    assert sum(b["pairs"] for b in buckets.values()) == 20
    assert next(iter(buckets.values()))["accuracy"] == 1.0  # small margins: pairs 0..6
    # whitespace, casing and appended text do not change length order (the suffix is
    # added to both), the order in the batch does not matter
    assert report["robustness"]["casing"] == report["accuracy"]
    assert report["robustness"]["response_order"] == report["accuracy"]
    assert report["length_correlation"] == pytest.approx(1.0)
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    assert (tmp_path / "margins.png").stat().st_size > 1000


def test_kendall_tau_from_ratings_perfect_and_reversed() -> None:
    ratings = [
        {"prompt": f"p{g}", "response": "a" * length, "rating": float(length)}
        for g in range(3)
        for length in (3, 7, 11, 15)
    ]
    pairs = pairs_from_records(ratings, "ratings", "reward", "d")
    assert len(pairs.groups) == 3
    assert evaluate_reward_model(_Planted(), pairs)["kendall_tau"]["mean"] == pytest.approx(1.0)
    assert evaluate_reward_model(_Planted(-1.0), pairs)["kendall_tau"]["mean"] == pytest.approx(
        -1.0
    )


def test_overconfident_model_has_higher_ece() -> None:
    # 40 pairs whose length gap is 1..40 characters; the better one is always preferred
    rows = [{"prompt": "p", "chosen": "a" * (50 + i), "rejected": "a" * 50} for i in range(1, 41)]
    pairs = pairs_from_records(rows, "preference", "reward", "d")
    # half the pairs have tiny gaps: a scale of 0.02 gives probabilities near 0.5..0.7,
    # against an observed frequency of 1 (under-confident); 10 saturates at 1 (calibrated here)
    modest = evaluate_reward_model(_Planted(0.02), pairs)["ece"]
    sharp = evaluate_reward_model(_Planted(10.0), pairs)["ece"]
    assert sharp < 0.01 < modest
    # 10 pairs one character apart; the longer is preferred in 7: P = 0.7 = sigmoid(ln(7/3))
    noisy = [{"prompt": "p", "chosen": "a" * 21, "rejected": "a" * 20}] * 7 + [
        {"prompt": "p", "chosen": "a" * 20, "rejected": "a" * 21}
    ] * 3
    pairs = pairs_from_records(noisy, "preference", "reward", "d")
    calibrated = evaluate_reward_model(_Planted(math.log(7 / 3)), pairs)["ece"]
    overconfident = evaluate_reward_model(_Planted(10.0), pairs)["ece"]
    assert calibrated == pytest.approx(0.0, abs=1e-6)  # float32 scores
    assert overconfident == pytest.approx(0.3, abs=1e-3)  # says 1.0 where 0.7 holds


def test_cost_model_orders_by_safety_and_reports_members() -> None:
    rows = [
        {
            "prompt": "p",
            "chosen": "aaaa",
            "rejected": "aaaaaaaa",
            "chosen_safety": 1.5,
            "rejected_safety": -1.5,
        },  # the safer (chosen) is shorter: lower cost, right
        {
            "prompt": "q",
            "chosen": "bbbbbbbb",
            "rejected": "bb",
            "chosen_safety": -0.5,
            "rejected_safety": 0.5,
        },  # the safer is "bb": right again
        {
            "prompt": "r",
            "chosen": "c",
            "rejected": "cc",
            "chosen_safety": 1.0,
            "rejected_safety": 1.0,
        },  # equal safety: left out
    ]
    pairs = pairs_from_records(rows, "safety", "cost", "d")
    assert len(pairs.better) == 2
    report = evaluate_reward_model(_Planted(1.0, kind="cost", members=2), pairs)
    assert report["accuracy"] == 1.0
    assert report["members"] == {"m0": 1.0, "m1": 1.0}
    assert report["member_std"] > 0
    # members agree on every pair's order: no vote split; margins differ by 10 %: std > 0
    assert report["pair_uncertainty"]["variance_ratio"] == 0.0
    assert report["pair_uncertainty"]["std"] > 0
    assert math.isfinite(report["ece"])
