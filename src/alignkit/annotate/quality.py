"""Collecting a round's labels with their vote weights, the aggregation of a task, and the
statistics of a round. The weights come from the accuracy model in aggregate.py.

A task's labels ``(choice_i, vote_i)``, ``v = +1`` for a, ``-1`` for b, ``0`` for a tie::

    L = sum_i vote_i * v_i                          # log-odds that a is the better response
    P(a better) = sigmoid(L);  winner = a if L > 0, b if L < 0
    margin = |2 P(a better) - 1| = tanh(|L| / 2)    # in [0, 1)
    weighted agreement = max_k sum_{i: choice_i = k} vote_i / sum_i vote_i

Tie policy: a task with ``margin <= tie_margin`` (default 0: all ties, votes that cancel, or no
label with weight) is not a preference and is left out of the export (counted in its report).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from alignkit.annotate.aggregate import (
    AnnotatorEstimate,
    Label,
    QualityConfig,
    estimate,
    vote_scale,
)
from alignkit.annotate.db import Database
from alignkit.annotate.schema import Annotation, Annotator, Gold, Prompt, Response, Task
from alignkit.data.tools import krippendorff_alpha, majority_share

__all__ = ["QualityConfig", "TaskResult", "aggregate", "collect", "stats"]

_VOTE = {"a": 1.0, "b": -1.0, "tie": 0.0}


@dataclass
class TaskResult:
    task: Task
    labels: list[Annotation] = field(default_factory=list)
    votes: list[float] = field(default_factory=list)  # vote weight of each label (module docstring)

    @property
    def log_odds(self) -> float:
        """``L``: the log-odds that response a is the better one."""
        return sum(w * _VOTE[a.choice] for a, w in zip(self.labels, self.votes, strict=True))

    @property
    def posterior(self) -> float:
        """P(a is the better response | the labels)."""
        return 1.0 / (1.0 + math.exp(-self.log_odds))

    @property
    def margin(self) -> float:
        return math.tanh(abs(self.log_odds) / 2)

    @property
    def weighted_agreement(self) -> float:
        """Vote-weighted share of the most weighted choice; nan when no label has weight."""
        weights: Counter[str] = Counter()
        for a, w in zip(self.labels, self.votes, strict=True):
            weights[a.choice] += w
        total = sum(self.votes)
        return max(weights.values()) / total if total > 0 else float("nan")

    @property
    def agreement(self) -> float:
        return majority_share([a.choice for a in self.labels])

    def weighted_share(self, attribute: str, value: Any) -> float:
        """Vote-weighted share of labels whose ``attribute`` equals ``value`` (None ignored)."""
        pairs = [(w, getattr(a, attribute)) for a, w in zip(self.labels, self.votes, strict=True)]
        pairs = [(w, v) for w, v in pairs if v is not None]
        total = sum(w for w, _ in pairs)
        return sum(w for w, v in pairs if v == value) / total if total else float("nan")


@dataclass
class Collected:
    tasks: dict[int, TaskResult]
    gold_record: dict[int, tuple[int, int]]  # annotator id -> (right, answered), ties included
    gold_labels: list[tuple[Annotation, bool]]  # (label, right)
    annotators: dict[int, Annotator]
    estimates: dict[int, AnnotatorEstimate]
    gold_tasks: int  # gold tasks in the round (served or not)


def collect(db: Database, config: QualityConfig | None = None) -> Collected:
    """Every label with its vote weight, grouped by (non-gold) task; gold records; estimates."""
    config = config or QualityConfig()
    with db.read() as session:
        tasks = {t.id: t for t in session.scalars(select(Task))}
        answers = dict(session.execute(select(Gold.task_id, Gold.answer)).all())
        labels = list(session.scalars(select(Annotation).order_by(Annotation.id)))
        annotators = {a.id: a for a in session.scalars(select(Annotator))}
    record: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    sided: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # non-tie gold answers only
    gold_labels = []
    for label in labels:
        if label.task_id in answers:
            right = label.choice == answers[label.task_id]
            record[label.annotator_id][0] += right
            record[label.annotator_id][1] += 1
            if label.choice != "tie":
                sided[label.annotator_id][0] += right
                sided[label.annotator_id][1] += 1
            gold_labels.append((label, right))
    real = [x for x in labels if x.task_id not in answers]
    estimates = estimate(
        [Label(x.annotator_id, x.task_id, x.choice, x.confidence) for x in real],
        {k: (v[0], v[1]) for k, v in sided.items()},
        config,
    )
    results: dict[int, TaskResult] = {}
    for label in real:
        result = results.setdefault(label.task_id, TaskResult(tasks[label.task_id]))
        result.labels.append(label)
        result.votes.append(
            estimates[label.annotator_id].weight * vote_scale(label.confidence, config)
        )
    return Collected(
        results,
        {k: (v[0], v[1]) for k, v in record.items()},
        gold_labels,
        annotators,
        estimates,
        gold_tasks=len(answers),
    )


def aggregate(result: TaskResult, tie_margin: float = 0.0) -> str | None:
    """``"a"``, ``"b"``, or None under the tie policy (``margin <= tie_margin``)."""
    if result.margin <= tie_margin or result.log_odds == 0:
        return None
    return "a" if result.log_odds > 0 else "b"


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stats(db: Database, config: QualityConfig | None = None) -> dict[str, Any]:
    """Throughput, agreement, per-annotator gold accuracy and biases, time per task."""
    data = collect(db, config)
    with db.read() as session:
        lengths = dict(session.execute(select(Response.id, Response.text)).all())
        n_prompts = len(session.scalars(select(Prompt.id)).all())
    lengths = {k: len(v) for k, v in lengths.items()}
    labels = [a for r in data.tasks.values() for a in r.labels]
    every = labels + [a for a, _ in data.gold_labels]
    times = sorted(a.submitted_at for a in every)
    span_h = (times[-1] - times[0]).total_seconds() / 3600 if len(times) > 1 else 0.0
    multi = [r for r in data.tasks.values() if len(r.labels) >= 2]
    longer_chosen = []
    per: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for result in data.tasks.values():
        la, lb = lengths[result.task.response_a_id], lengths[result.task.response_b_id]
        for label in result.labels:
            if label.choice != "tie" and la != lb:
                longer_chosen.append((label.choice == "a") == (la > lb))
    for label in every:
        row = per[label.annotator_id]
        row["seconds"].append(label.seconds)
        row["confidence"].append(label.confidence)
        if label.choice != "tie":
            row["left"].append((label.choice == "a") == label.left_is_a)
        row["tie"].append(label.choice == "tie")
    annotators = {}
    for annotator_id, row in sorted(per.items()):
        correct, answered = data.gold_record.get(annotator_id, (0, 0))
        judged = data.estimates.get(annotator_id)
        annotators[data.annotators[annotator_id].name] = {
            "labels": len(row["seconds"]),
            "gold_answered": answered,
            "gold_accuracy": correct / answered if answered else None,
            "left_choice_rate": statistics.fmean(row["left"]) if row["left"] else None,
            "tie_rate": statistics.fmean(row["tie"]),
            "median_seconds": statistics.median(row["seconds"]),
            "mean_confidence": statistics.fmean(row["confidence"]),
            "accuracy_estimate": judged.accuracy if judged else None,
            "weight": judged.weight if judged else None,
            "evidence_labels": judged.evidence if judged else 0,
            "below_chance_on_gold": judged.below_chance_on_gold if judged else False,
        }
    seconds = [a.seconds for a in every]
    sided = [(a.choice == "a") == a.left_is_a for a in every if a.choice != "tie"]
    return {
        "prompts": n_prompts,
        "tasks": sum(not t.is_gold for t in _all_tasks(db)),
        "tasks_complete": sum(r.task.submitted >= r.task.target for r in data.tasks.values()),
        "labels": len(labels),
        "gold_tasks": data.gold_tasks,
        "gold_labels": len(data.gold_labels),
        "labels_per_hour": len(every) / span_h if span_h > 0 else None,
        "agreement_majority_share": statistics.fmean(r.agreement for r in multi) if multi else None,
        "agreement_krippendorff_alpha": krippendorff_alpha(
            [[a.choice for a in r.labels] for r in multi], level="nominal"
        )
        if multi
        else None,
        "gold_accuracy": statistics.fmean(c for _, c in data.gold_labels)
        if data.gold_labels
        else None,
        "left_choice_rate": statistics.fmean(sided) if sided else None,
        "longer_chosen_rate": statistics.fmean(longer_chosen) if longer_chosen else None,
        "seconds_median": statistics.median(seconds) if seconds else None,
        "seconds_p90": _quantile(seconds, 0.9) if seconds else None,
        "annotators": annotators,
    }


def _all_tasks(db: Database) -> list[Task]:
    with db.read() as session:
        return list(session.scalars(select(Task)))
