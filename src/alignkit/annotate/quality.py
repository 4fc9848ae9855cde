"""Annotation quality, quality-weighted aggregation and the statistics of a labelling round.

Per-annotation quality (seed 002 §4.2 ``assess_annotation_quality``, without the reason score)::

    q = (gold_accuracy + time_ok + confidence / 5) / 3
    gold_accuracy = (correct + 1) / (answered + 2)     # the annotator's gold record, Laplace-smoothed
    time_ok = 1 if min_seconds <= seconds <= max_seconds else 0.5

Aggregation of a task's labels ``(choice_i, confidence_i, q_i)`` with ``v = +1`` for a, ``-1`` for b,
``0`` for tie::

    s = sum_i q_i * v_i * confidence_i / 5  /  sum_i q_i          # in [-1, 1]
    winner = a if s > 0, b if s < 0; margin = |s|
    weighted agreement = max_k sum_{i: choice_i = k} q_i / sum_i q_i

Tie policy: a task with ``|s| <= tie_margin`` (default 0: exactly balanced, or all ties) is not a
preference and is left out of the export (counted in its report).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from alignkit.annotate.db import Database
from alignkit.annotate.schema import Annotation, Annotator, Gold, Prompt, Response, Task
from alignkit.data.tools import krippendorff_alpha, majority_share

__all__ = ["QualityConfig", "TaskResult", "aggregate", "annotation_quality", "collect", "stats"]

_VOTE = {"a": 1.0, "b": -1.0, "tie": 0.0}


@dataclass(frozen=True)
class QualityConfig:
    min_seconds: float = 3.0
    max_seconds: float = 600.0


def annotation_quality(
    gold_correct: int, gold_answered: int, seconds: float, confidence: int, config: QualityConfig
) -> float:
    """``q`` of one annotation (module docstring), in (0.23, 1]."""
    gold_accuracy = (gold_correct + 1) / (gold_answered + 2)
    time_ok = 1.0 if config.min_seconds <= seconds <= config.max_seconds else 0.5
    return (gold_accuracy + time_ok + confidence / 5) / 3


@dataclass
class TaskResult:
    task: Task
    labels: list[Annotation] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)

    @property
    def score(self) -> float:
        """``s`` of the module docstring."""
        total = sum(self.quality)
        return (
            sum(
                q * _VOTE[a.choice] * a.confidence / 5
                for a, q in zip(self.labels, self.quality, strict=True)
            )
            / total
        )

    @property
    def weighted_agreement(self) -> float:
        weights: Counter[str] = Counter()
        for a, q in zip(self.labels, self.quality, strict=True):
            weights[a.choice] += q
        return max(weights.values()) / sum(self.quality)

    @property
    def agreement(self) -> float:
        return majority_share([a.choice for a in self.labels])

    def weighted_share(self, attribute: str, value: Any) -> float:
        """Quality-weighted share of labels whose ``attribute`` equals ``value`` (None ignored)."""
        pairs = [(q, getattr(a, attribute)) for a, q in zip(self.labels, self.quality, strict=True)]
        pairs = [(q, v) for q, v in pairs if v is not None]
        total = sum(q for q, _ in pairs)
        return sum(q for q, v in pairs if v == value) / total if total else float("nan")


@dataclass
class Collected:
    tasks: dict[int, TaskResult]
    gold_record: dict[int, tuple[int, int]]  # annotator id -> (correct, answered)
    gold_labels: list[tuple[Annotation, bool]]  # (label, correct)
    annotators: dict[int, Annotator]


def collect(db: Database, config: QualityConfig | None = None) -> Collected:
    """Every label with its quality, grouped by (non-gold) task; gold records per annotator."""
    config = config or QualityConfig()
    with db.read() as session:
        tasks = {t.id: t for t in session.scalars(select(Task))}
        answers = dict(session.execute(select(Gold.task_id, Gold.answer)).all())
        labels = list(session.scalars(select(Annotation).order_by(Annotation.id)))
        annotators = {a.id: a for a in session.scalars(select(Annotator))}
    record: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    gold_labels = []
    for label in labels:
        if label.task_id in answers:
            correct = label.choice == answers[label.task_id]
            record[label.annotator_id][0] += correct
            record[label.annotator_id][1] += 1
            gold_labels.append((label, correct))
    results: dict[int, TaskResult] = {}
    for label in labels:
        if label.task_id in answers:
            continue
        correct, answered = record.get(label.annotator_id, (0, 0))
        result = results.setdefault(label.task_id, TaskResult(tasks[label.task_id]))
        result.labels.append(label)
        result.quality.append(
            annotation_quality(correct, answered, label.seconds, label.confidence, config)
        )
    return Collected(results, {k: (v[0], v[1]) for k, v in record.items()}, gold_labels, annotators)


def aggregate(result: TaskResult, tie_margin: float = 0.0) -> str | None:
    """``"a"``, ``"b"``, or None under the tie policy (``|s| <= tie_margin``)."""
    s = result.score
    if abs(s) <= tie_margin:
        return None
    return "a" if s > 0 else "b"


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
        for label, q in zip(result.labels, result.quality, strict=True):
            if label.choice != "tie" and la != lb:
                longer_chosen.append((label.choice == "a") == (la > lb))
            row = per[label.annotator_id]
            row["quality"].append(q)
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
        annotators[data.annotators[annotator_id].name] = {
            "labels": len(row["seconds"]),
            "gold_answered": answered,
            "gold_accuracy": correct / answered if answered else None,
            "left_choice_rate": statistics.fmean(row["left"]) if row["left"] else None,
            "tie_rate": statistics.fmean(row["tie"]),
            "median_seconds": statistics.median(row["seconds"]),
            "mean_confidence": statistics.fmean(row["confidence"]),
            "mean_quality": statistics.fmean(row["quality"]) if row["quality"] else None,
        }
    seconds = [a.seconds for a in every]
    sided = [(a.choice == "a") == a.left_is_a for a in every if a.choice != "tie"]
    return {
        "prompts": n_prompts,
        "tasks": sum(not t.is_gold for t in _all_tasks(db)),
        "tasks_complete": sum(r.task.submitted >= r.task.target for r in data.tasks.values()),
        "labels": len(labels),
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
