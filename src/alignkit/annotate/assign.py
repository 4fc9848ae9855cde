"""Claiming tasks and storing labels, safe under concurrency on SQLite and PostgreSQL.

A claim runs in one write transaction: ``BEGIN IMMEDIATE`` on SQLite (db.py), and on PostgreSQL
the annotator's row ``FOR UPDATE`` (one claim per annotator at a time) plus the candidate task
``FOR UPDATE SKIP LOCKED``. Either way the counter moves by a guarded
``UPDATE tasks SET assigned = assigned + 1 WHERE id = :id AND assigned < target`` whose row count
is checked, and ``UNIQUE(task_id, annotator_id)`` makes a second view of a task impossible.
Leases past their expiry go back to the pool at the next claim. A submission carries a client
idempotency key (``UNIQUE``): a retry returns the stored label instead of adding one.

Gold tasks are served exactly like the others: same pool, same order, same target of distinct
annotators, same growth on low agreement, same progress counts. Nothing the server does or
answers depends on whether a task is gold (the test in tests/annotate/test_annotate_gold.py
plays a client that watches every field, the timing and the order).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from alignkit.annotate.db import Database, utcnow
from alignkit.annotate.limits import MAX_ID, check_number
from alignkit.annotate.schema import Annotation, Annotator, Assignment, Prompt, Response, Task
from alignkit.data.tools import majority_share

__all__ = [
    "AssignConfig",
    "LabelError",
    "Served",
    "Submission",
    "claim",
    "progress",
    "release_leases",
    "retry_conflicts",
    "submit",
]

_RETRYABLE = {"40P01", "40001"}  # PostgreSQL: deadlock detected, serialization failure


T = TypeVar("T")


class LabelError(Exception):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AssignConfig:
    lease_seconds: float = 1800.0
    min_agreement: float = 0.7  # majority share under which a finished task gets one more annotator
    max_annotators: int = 5  # cap of that growth

    def __post_init__(self) -> None:
        check_number("lease_seconds", self.lease_seconds, 0, 7 * 24 * 3600, low_open=True)
        check_number("min_agreement", self.min_agreement, 0, 1)
        check_number("max_annotators", self.max_annotators, 1, 1000, integer=True)


@dataclass(frozen=True)
class Served:
    assignment_id: int
    prompt: Any
    left: str
    right: str
    ask_safety: bool


@dataclass(frozen=True)
class Submission:
    idempotency_key: str
    choice: str  # left | right | tie (what the annotator saw)
    confidence: int  # 1..5
    reason: str = ""
    safer: str | None = None  # left | right | same
    left_safe: bool | None = None
    right_safe: bool | None = None


def _end_leases(session: Session, *where: Any) -> int:
    """Mark the matching live leases expired and give their slots back to their tasks."""
    stale = update(Assignment).where(Assignment.status == "leased", *where)
    task_ids = session.scalars(stale.values(status="expired").returning(Assignment.task_id)).all()
    for task_id in task_ids:
        session.execute(update(Task).where(Task.id == task_id).values(assigned=Task.assigned - 1))
    return len(task_ids)


def _expire_leases(session: Session) -> None:
    _end_leases(session, Assignment.lease_expires_at < utcnow())


def release_leases(session: Session, annotator_id: int) -> int:
    """Put ``annotator_id``'s live lease back in the pool now (revocation, a new token); a label
    sent for it later is refused with 409. Returns how many were released."""
    return _end_leases(session, Assignment.annotator_id == annotator_id)


def _serve(session: Session, assignment: Assignment) -> Served:
    task = session.get(Task, assignment.task_id)
    a, b = session.get(Response, task.response_a_id), session.get(Response, task.response_b_id)
    left, right = (a, b) if assignment.left_is_a else (b, a)
    prompt = json.loads(
        session.scalar(select(Prompt.prompt_json).where(Prompt.id == task.prompt_id))
    )
    return Served(assignment.id, prompt, left.text, right.text, task.ask_safety)


def _open_to(annotator_id: int) -> Any:
    """Tasks this annotator may still be served: not seen by them, a slot left (gold or not)."""
    seen = exists().where(Assignment.task_id == Task.id, Assignment.annotator_id == annotator_id)
    return and_(~seen, Task.assigned < Task.target)


def _candidate(session: Session, annotator_id: int, postgres: bool) -> int | None:
    # started tasks first (so tasks finish), then creation order
    query = (
        select(Task.id)
        .where(_open_to(annotator_id))
        .order_by(Task.assigned.desc(), Task.id)
        .limit(1)
    )
    if not postgres:
        return session.scalar(query)
    # Skip rows other transactions hold (a claim or a submit of the same task) to spread
    # annotators; when every open task is held, wait for one instead: skipping then would
    # tell the annotator that nothing is left while the task still needs them.
    task_id = session.scalar(query.with_for_update(skip_locked=True, of=Task))
    if task_id is None:
        task_id = session.scalar(query.with_for_update(of=Task))
    return task_id


def claim(
    db: Database, annotator_id: int, config: AssignConfig, rng: random.Random
) -> Served | None:
    """The annotator's live lease, or a newly claimed task, or None when nothing is left for them."""
    postgres = db.dialect == "postgresql"
    with db.write() as session:
        if postgres:
            session.scalar(
                select(Annotator.id).where(Annotator.id == annotator_id).with_for_update()
            )
        _expire_leases(session)
        live = session.scalar(
            select(Assignment)
            .where(Assignment.annotator_id == annotator_id, Assignment.status == "leased")
            .limit(1)
        )
        if live is not None:
            return _serve(session, live)
        for _ in range(5):  # a lost guarded update (PostgreSQL only) tries the next candidate
            task_id = _candidate(session, annotator_id, postgres)
            if task_id is None:
                return None
            won = session.execute(
                update(Task)
                .where(Task.id == task_id, Task.assigned < Task.target)
                .values(assigned=Task.assigned + 1)
            )
            if won.rowcount != 1:
                continue
            now = utcnow()
            assignment = Assignment(
                task_id=task_id,
                annotator_id=annotator_id,
                status="leased",
                left_is_a=rng.random() < 0.5,
                served_at=now,
                lease_expires_at=now + timedelta(seconds=config.lease_seconds),
            )
            session.add(assignment)
            session.flush()
            return _serve(session, assignment)
        return None


def retry_conflicts(fn: Callable[..., T], *args: Any, attempts: int = 3) -> T:
    """Run a claim or submit again when PostgreSQL aborted it as a deadlock victim (a late label
    for a lease that a concurrent claim is expiring can cross locks). Both are safe to repeat:
    the aborted transaction left nothing, and a submission is idempotent by its key."""
    for attempt in range(attempts):
        try:
            return fn(*args)
        except OperationalError as err:
            if getattr(err.orig, "sqlstate", None) not in _RETRYABLE or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _to_ab(side: str | None, left_is_a: bool) -> str | None:
    if side in ("left", "right"):
        return "a" if (side == "left") == left_is_a else "b"
    return {"tie": "tie", "same": "same", None: None}[side]


def submit(
    db: Database, annotator_id: int, assignment_id: int, sub: Submission, config: AssignConfig
) -> tuple[int, bool]:
    """Store a label; returns ``(annotation id, was a retry)``. Committed before it returns."""
    if not 1 <= assignment_id <= MAX_ID:  # a larger id cannot exist (nor be bound on PostgreSQL)
        raise LabelError(404, f"no assignment {assignment_id} for you")
    postgres = db.dialect == "postgresql"
    with db.write() as session:
        # Lock the assignment first (PostgreSQL): a concurrent retry of the same label waits here
        # and then finds the committed key below, instead of racing to a second insert.
        query = select(Assignment).where(Assignment.id == assignment_id)
        assignment = session.scalar(query.with_for_update() if postgres else query)
        earlier = session.scalar(
            select(Annotation).where(Annotation.idempotency_key == sub.idempotency_key)
        )
        if earlier is not None:
            if earlier.annotator_id == annotator_id and earlier.assignment_id == assignment_id:
                return earlier.id, True
            raise LabelError(409, "idempotency_key was already used for another submission")
        if assignment is None or assignment.annotator_id != annotator_id:
            raise LabelError(404, f"no assignment {assignment_id} for you")
        if assignment.status == "submitted":
            raise LabelError(409, f"assignment {assignment_id} was already submitted")
        if assignment.status == "expired":
            raise LabelError(
                409,
                f"assignment {assignment_id}: the lease expired and the task went back to the pool",
            )
        task = session.get(Task, assignment.task_id)
        if task.ask_safety and (
            sub.safer is None or sub.left_safe is None or sub.right_safe is None
        ):
            raise LabelError(
                422, "this task asks the safety question: give safer, left_safe and right_safe"
            )
        now = utcnow()
        left_is_a = assignment.left_is_a
        a_safe, b_safe = (
            (sub.left_safe, sub.right_safe) if left_is_a else (sub.right_safe, sub.left_safe)
        )
        annotation = Annotation(
            assignment_id=assignment.id,
            task_id=task.id,
            annotator_id=annotator_id,
            idempotency_key=sub.idempotency_key,
            choice=_to_ab(sub.choice, left_is_a),
            confidence=sub.confidence,
            reason=sub.reason,
            left_is_a=left_is_a,
            served_at=assignment.served_at,
            submitted_at=now,
            seconds=(now - assignment.served_at).total_seconds(),
            safer=_to_ab(sub.safer, left_is_a),
            a_safe=a_safe if task.ask_safety else None,
            b_safe=b_safe if task.ask_safety else None,
        )
        session.add(annotation)
        assignment.status = "submitted"
        session.execute(update(Task).where(Task.id == task.id).values(submitted=Task.submitted + 1))
        session.flush()
        session.refresh(task)
        if task.submitted >= task.target and task.target < config.max_annotators:  # gold too
            choices = session.scalars(
                select(Annotation.choice).where(Annotation.task_id == task.id)
            ).all()
            if majority_share(choices) < config.min_agreement:
                task.target += 1  # low agreement: one more annotator, up to the cap
        return annotation.id, False


def progress(db: Database, annotator_id: int) -> dict[str, int]:
    """Labels this annotator gave, and tasks still open to them (gold or not: the claim's pool)."""
    with db.read() as session:
        done = session.scalar(
            select(func.count(Annotation.id)).where(Annotation.annotator_id == annotator_id)
        )
        left = session.scalar(select(func.count(Task.id)).where(_open_to(annotator_id)))
    return {"done": int(done or 0), "available": int(left or 0)}
