"""Simulated annotator populations against the aggregation (alignkit.annotate.aggregate).

Each round has 400 real pair tasks and 40 gold ones (the truth known for all), each labelled by
3 distinct annotators drawn at random; annotators behave as:

- honest: names the better response with probability 0.9 (ties 3 %), confidence 3-5;
- noisy: probability 0.65, confidence 1-5;
- spammer: a coin flip, confidence 5, answers in 1 s;
- cheater: knows which tasks are gold and their answers; answers every gold right and every
  real pair wrong, confidence 5, answers in 1 s;
- colluding pair: two annotators who agree on a shared coin flip per task (both give the same
  answer whenever both label a task), confidence 5.

Three aggregations: plain majority (ties dropped), the formula alignkit used before (quality
q = (gold accuracy + time_ok + confidence/5)/3, s = sum q v conf/5 / sum q), and the model.
The table docs/annotate.md shows is printed by::

    PYTHONPATH=src .venv/bin/python tests/annotate/annotate_sim.py
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from alignkit.annotate.aggregate import Label, QualityConfig, estimate, vote_scale

REAL_TASKS, GOLD_TASKS, PER_TASK = 400, 40, 3


@dataclass
class Annotator:
    name: str
    kind: str
    accuracy: float = 0.5
    partner: str | None = None  # the colluding partner


POPULATIONS: dict[str, list[Annotator]] = {
    "honest": [Annotator(f"h{i}", "honest", 0.9) for i in range(5)],
    "noisy": [Annotator(f"h{i}", "honest", 0.9) for i in range(2)]
    + [Annotator(f"n{i}", "noisy", 0.65) for i in range(3)],
    "spammers": [Annotator(f"h{i}", "honest", 0.9) for i in range(3)]
    + [Annotator(f"s{i}", "spammer") for i in range(2)],
    "cheater": [Annotator(f"h{i}", "honest", 0.9) for i in range(4)]
    + [Annotator("cheat", "cheater")],
    "colluding pair": [Annotator(f"h{i}", "honest", 0.9) for i in range(3)]
    + [Annotator("c0", "colluder", partner="c1"), Annotator("c1", "colluder", partner="c0")],
    "all of them": [Annotator(f"h{i}", "honest", 0.9) for i in range(4)]
    + [Annotator("n0", "noisy", 0.65), Annotator("s0", "spammer"), Annotator("cheat", "cheater")]
    + [Annotator("c0", "colluder", partner="c1"), Annotator("c1", "colluder", partner="c0")],
}


@dataclass
class Round:
    truth: dict[int, str]  # task -> "a" | "b"
    gold: set[int]
    labels: list[tuple[str, int, str, int, float]] = field(default_factory=list)
    # (annotator, task, choice, confidence, seconds)


def _other(side: str) -> str:
    return "b" if side == "a" else "a"


def simulate(population: list[Annotator], seed: int) -> Round:
    rng = random.Random(seed)
    n = REAL_TASKS + GOLD_TASKS
    truth = {t: rng.choice("ab") for t in range(n)}
    gold = set(rng.sample(range(n), GOLD_TASKS))
    sim = Round(truth, gold)
    coins = {t: rng.choice("ab") for t in range(n)}  # the colluders' shared answers
    for task in range(n):
        right = truth[task]
        for who in rng.sample(population, PER_TASK):
            if who.kind in ("honest", "noisy"):
                if who.kind == "honest" and rng.random() < 0.03:
                    choice = "tie"
                else:
                    choice = right if rng.random() < who.accuracy else _other(right)
                low = 3 if who.kind == "honest" else 1
                sim.labels.append((who.name, task, choice, rng.randint(low, 5), 12.0))
            elif who.kind == "spammer":
                sim.labels.append((who.name, task, rng.choice("ab"), 5, 1.0))
            elif who.kind == "cheater":
                choice = right if task in gold else _other(right)
                sim.labels.append((who.name, task, choice, 5, 1.0))
            else:  # colluder
                sim.labels.append((who.name, task, coins[task], 5, 8.0))
    return sim


def _gold_record(sim: Round, sided: bool) -> dict[str, tuple[int, int]]:
    record: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for who, task, choice, _, _ in sim.labels:
        if task in sim.gold and not (sided and choice == "tie"):
            record[who][0] += choice == sim.truth[task]
            record[who][1] += 1
    return {k: (v[0], v[1]) for k, v in record.items()}


def _decide(votes: dict[int, float]) -> dict[int, str]:
    return {t: "a" if s > 0 else "b" for t, s in votes.items() if s != 0}


_V = {"a": 1.0, "b": -1.0, "tie": 0.0}


def majority(sim: Round) -> dict[int, str]:
    votes: dict[int, float] = defaultdict(float)
    for _, task, choice, _, _ in sim.labels:
        if task not in sim.gold:
            votes[task] += _V[choice]
    return _decide(votes)


def old_formula(sim: Round) -> dict[int, str]:
    """The weighting alignkit shipped before: q = (gold acc + time_ok + conf/5) / 3."""
    record = _gold_record(sim, sided=False)
    num: dict[int, float] = defaultdict(float)
    for who, task, choice, confidence, seconds in sim.labels:
        if task in sim.gold:
            continue
        right, answered = record.get(who, (0, 0))
        q = (right + 1) / (answered + 2) + (1.0 if 3 <= seconds <= 600 else 0.5) + confidence / 5
        num[task] += q / 3 * _V[choice] * confidence / 5
    return _decide(num)


def model(sim: Round, config: QualityConfig | None = None) -> tuple[dict[int, str], dict]:
    config = config or QualityConfig()
    real = [x for x in sim.labels if x[1] not in sim.gold]
    estimates = estimate(
        [Label(who, task, choice, conf) for who, task, choice, conf, _ in real],
        _gold_record(sim, sided=True),
        config,
    )
    votes: dict[int, float] = defaultdict(float)
    for who, task, choice, conf, _ in real:
        votes[task] += estimates[who].weight * vote_scale(conf, config) * _V[choice]
    return _decide(votes), estimates


@dataclass(frozen=True)
class Score:
    correct: float  # share of all real tasks exported with the true better response
    exported: float  # share of real tasks exported (the rest: ties, no weight)
    cheater_decides: float | None  # share of the cheater's tasks its label decided


def score(sim: Round, method: Callable[[Round], dict[int, str]]) -> Score:
    """``cheater_decides``: of the real tasks the cheater labelled, the share exported as the
    cheater said that the same round without the cheater's real labels exports otherwise."""
    decided = method(sim)
    real = [t for t in sim.truth if t not in sim.gold]
    correct = sum(decided.get(t) == sim.truth[t] for t in real) / len(real)
    cheats = [(t, c) for who, t, c, _, _ in sim.labels if who == "cheat" and t not in sim.gold]
    decides = None
    if cheats:
        honest_only = Round(
            sim.truth, sim.gold, [x for x in sim.labels if x[0] != "cheat" or x[1] in sim.gold]
        )
        without = method(honest_only)
        decides = sum(decided.get(t) == c != without.get(t) for t, c in cheats) / len(cheats)
    return Score(correct, len(decided) / len(real), decides)


METHODS: dict[str, Callable[[Round], dict[int, str]]] = {
    "majority": majority,
    "previous formula": old_formula,
    "model": lambda sim: model(sim)[0],
}


def table(seeds: range = range(5)) -> str:
    lines = [
        "| population | majority: right (exported) | previous formula: right (exported) "
        "| model: right (exported), lowest seed | cheater's label decides (majority / previous / model) |",
        "|---|---|---|---|---|",
    ]
    for name, population in POPULATIONS.items():
        cells, wins = [], []
        for label, method in METHODS.items():
            scores = [score(simulate(population, s), method) for s in seeds]
            right = statistics.fmean(s.correct for s in scores)
            exported = statistics.fmean(s.exported for s in scores)
            low = f", {min(s.correct for s in scores):.1%}" if label == "model" else ""
            cells.append(f"{right:.1%} ({exported:.1%}){low}")
            if scores[0].cheater_decides is not None:
                wins.append(f"{statistics.fmean(s.cheater_decides for s in scores):.1%}")
        lines.append(f"| {name} | {' | '.join(cells)} | {' / '.join(wins) or '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
