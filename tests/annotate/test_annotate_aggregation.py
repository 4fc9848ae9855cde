"""The aggregation: weights rest on evidence of accuracy (gold and agreement), confidence is
bounded, annotators below chance get nothing, and simulated populations of honest, noisy,
spamming, cheating and colluding annotators export the truth on a stated share of tasks."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
from annotate_helpers import seed_round, side_for, task_of
from annotate_sim import METHODS, POPULATIONS, model, score, simulate
from sqlalchemy import select

from alignkit.annotate.aggregate import QualityConfig, below_chance, estimate, vote_scale
from alignkit.annotate.assign import AssignConfig, Submission, claim, submit
from alignkit.annotate.db import open_database
from alignkit.annotate.export import export_rows
from alignkit.annotate.ingest import add_annotator
from alignkit.annotate.quality import collect
from alignkit.annotate.schema import Gold, Task
from alignkit.errors import ConfigError

# The share of the 400 real tasks the model exports with the true better response, at least, on
# every one of seeds 0-4 (docs/annotate.md shows the table: `python tests/annotate/annotate_sim.py`).
STATED = {
    "honest": 0.94,
    "noisy": 0.84,
    "spammers": 0.87,
    "cheater": 0.90,
    "colluding pair": 0.88,
    "all of them": 0.80,
}


@pytest.mark.parametrize("population", list(POPULATIONS))
def test_simulated_populations_export_the_truth(population: str) -> None:
    seeds = range(5)
    scores = {
        name: [score(simulate(POPULATIONS[population], s), m) for s in seeds]
        for name, m in METHODS.items()
    }
    model_right = [s.correct for s in scores["model"]]
    assert min(model_right) >= STATED[population], model_right
    # never worse than a plain majority, which the bad annotators can swing
    assert statistics.fmean(model_right) >= statistics.fmean(s.correct for s in scores["majority"])
    if scores["model"][0].cheater_decides is not None:
        assert all(s.cheater_decides == 0 for s in scores["model"])  # the cheater never wins
        assert statistics.fmean(s.cheater_decides for s in scores["majority"]) > 0.1  # it could


def test_estimates_recover_each_annotators_accuracy() -> None:
    truth = {"honest": 0.9, "noisy": 0.65, "spammer": 0.5}
    for population in ("honest", "noisy", "spammers", "colluding pair", "cheater"):
        for seed in range(3):
            _, estimates = model(simulate(POPULATIONS[population], seed))
            honest = min(
                estimates[w.name].weight for w in POPULATIONS[population] if w.kind == "honest"
            )
            for who in POPULATIONS[population]:
                found = estimates[who.name]
                if who.kind == "cheater":  # right on gold only: 10 % of its labels
                    assert found.accuracy < 0.3 and found.weight == 0
                elif who.kind == "colluder":  # at chance, but each seems to confirm the other
                    assert found.accuracy < 0.62 and found.weight < honest / 4
                else:
                    assert found.accuracy == pytest.approx(truth[who.kind], abs=0.08)


def _beta_cdf_half(a: int, b: int) -> float:
    """P(X < 1/2) for X ~ Beta(a, b), by numerical integration of the density."""
    # 40k intervals: the trapezoid rule is within 1e-9 of the exact tail on these polynomials,
    # far inside the 1e-6 kept clear of the threshold below (400k points took seconds)
    x = np.linspace(0.0, 1.0, 40_001)
    density = x ** (a - 1) * (1 - x) ** (b - 1)
    return float(np.trapezoid(density[:20_001], x[:20_001]) / np.trapezoid(density, x))


def test_below_chance_is_the_beta_posterior_tail() -> None:
    for right in range(8):
        for answered in range(right, 12):
            tail = _beta_cdf_half(1 + right, 1 + answered - right)
            if abs(tail - 0.9) > 1e-6:  # away from the threshold itself
                assert below_chance(right, answered, 0.9) == (tail >= 0.9), (right, answered)
    # the spammer of the adversarial test (0 of 6 gold) is below chance; 3 of 6 is not
    assert below_chance(0, 6, 0.9) and below_chance(1, 6, 0.9) and not below_chance(3, 6, 0.9)
    assert not below_chance(0, 0, 0.9)


def test_confidence_is_bounded_and_cannot_buy_weight() -> None:
    config = QualityConfig()
    assert [vote_scale(c, config) for c in (1, 3, 5)] == pytest.approx([0.8, 0.9, 1.0])
    labels = [
        # a spammer at confidence 5 on gold at chance, and two annotators who agree
        *(("spam", t, random.Random(t).choice("ab"), 5) for t in range(40)),
        *(("x", t, "a", 1) for t in range(40)),
        *(("y", t, "a", 2) for t in range(40)),
    ]
    from alignkit.annotate.aggregate import Label

    estimates = estimate(
        [Label(*x) for x in labels], {"spam": (3, 6), "x": (6, 6), "y": (6, 6)}, config
    )
    # at its most confident the spammer weighs a fifth of an annotator with evidence at its least
    spam, x = estimates["spam"].weight, estimates["x"].weight
    assert spam * vote_scale(5, config) < x * vote_scale(1, config) / 5
    # 0 right of 6 gold: no weight whatever its confidence and agreement
    barred = estimate([Label(*x) for x in labels], {"spam": (0, 6)}, config)
    assert barred["spam"].weight == 0 and barred["spam"].below_chance_on_gold
    with pytest.raises(ConfigError, match="confidence_floor must be"):
        QualityConfig(confidence_floor=1.5)
    with pytest.raises(ConfigError, match="prior_right must be"):
        QualityConfig(prior_right=math.nan)


def _label_round(db, plan: dict[str, object], per_task: int) -> dict[str, dict[int, str]]:
    """Every annotator in ``plan`` labels what it is served: ``plan[name](is_gold, answer)``
    returns (want, confidence); returns each one's labels by task ("a" | "b")."""
    config = AssignConfig(min_agreement=0.0)
    rng = random.Random(0)
    given: dict[str, dict[int, str]] = {}
    for annotator_id, (name, behave) in enumerate(plan.items(), start=1):
        given[name] = {}
        while (task := claim(db, annotator_id, config, rng)) is not None:
            task_id = task_of(db, task.assignment_id)
            with db.read() as s:
                answer = s.get(Gold, task_id)
                truth = answer.answer if answer else "a"  # seed_round: response a is the better
            want, confidence = behave(answer is not None, truth)
            side = side_for(db, task.assignment_id, want)
            sub = Submission(f"{name}-{task.assignment_id}", side, confidence)
            submit(db, annotator_id, task.assignment_id, sub, config)
            given[name][task_id] = want
    return given


def _gold_round(tmp_path, per_task: int):
    db = open_database(f"sqlite:///{tmp_path / 'q.db'}")
    seed_round(db, n_prompts=30, responses_per_prompt=2, annotators_per_task=per_task)
    with db.write() as session:  # six of the pairs become gold, a the better (as the others)
        for task in session.scalars(select(Task).order_by(Task.id).limit(6)):
            task.is_gold = True
            session.add(Gold(task_id=task.id, answer="a", kind="imported"))
    return db


def test_a_spammer_no_longer_outvotes_an_honest_annotator(tmp_path) -> None:
    # the adversarial test's row 51: honest (gold all right, confidence 3) against a spammer
    # (gold all wrong, confidence 5) on the same tasks, two annotators per task
    db = _gold_round(tmp_path, per_task=2)
    for name in ("honest", "spam"):
        add_annotator(db, name)
    flip = {"a": "b", "b": "a"}
    given = _label_round(
        db,
        {"honest": lambda gold, truth: (truth, 3), "spam": lambda gold, truth: (flip[truth], 5)},
        per_task=2,
    )
    rows, report = export_rows(db)
    assert len(rows) == 24  # every real task, each to the honest annotator's answer
    assert all(r["chosen"].startswith("Answer 0") for r in rows)
    assert collect(db).estimates[2].weight == 0  # 0 right of 6 gold: below chance
    assert any("no weight (at or below chance): spam" in w for w in report.warnings)
    assert set(given["honest"]) == set(given["spam"])


def test_a_cheater_who_knows_the_gold_does_not_win(tmp_path) -> None:
    # row 53: right on gold, wrong on every real pair, confidence 5, among honest annotators
    db = _gold_round(tmp_path, per_task=3)
    for name in ("h1", "h2", "cheat"):
        add_annotator(db, name)
    flip = {"a": "b", "b": "a"}
    _label_round(
        db,
        {
            "h1": lambda gold, truth: (truth, 3),
            "h2": lambda gold, truth: (truth, 4),
            "cheat": lambda gold, truth: (truth if gold else flip[truth], 5),
        },
        per_task=3,
    )
    estimates = collect(db).estimates
    assert estimates[3].gold_right == estimates[3].gold_answered == 6  # perfect on gold...
    assert estimates[3].weight == 0 < estimates[1].weight  # ...but the others disagree with it
    rows, _ = export_rows(db)
    assert len(rows) == 24 and all(r["chosen"].startswith("Answer 0") for r in rows)
    assert all(r["provenance"]["p_chosen"] > 0.9 for r in rows)
