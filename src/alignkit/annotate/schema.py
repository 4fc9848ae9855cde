"""Tables of the labelling server (SQLAlchemy 2 ORM). The schema's version lives in `db.py`.

Choices are stored in terms of the task's responses ``a`` and ``b`` (``"a" | "b" | "tie"``);
``left_is_a`` records which one the annotator saw on the left, so position bias can be measured.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Annotation",
    "Annotator",
    "Assignment",
    "Base",
    "Gold",
    "Prompt",
    "Response",
    "Task",
]


class Base(DeclarativeBase):
    pass


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_json: Mapped[str] = mapped_column(Text)  # a string or a message list, as JSON
    prompt_key: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of prompt_json
    category: Mapped[str] = mapped_column(String(200), default="general")
    adversarial: Mapped[bool] = mapped_column(Boolean, default=False)
    high_value: Mapped[bool] = mapped_column(Boolean, default=False)
    flags_json: Mapped[str] = mapped_column(Text, default="{}")  # every other flag, kept as given
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # schema v3: lent one response to an automatic gold pair; never gets tasks of its own
    gold_donor: Mapped[bool] = mapped_column(Boolean, default=False)


class Response(Base):
    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("prompt_id", "text_hash"),)  # dedup per prompt
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64))
    # "model" (generated or imported as a model output), "donor" (a copy of a model response to
    # another prompt, the worse side of its gold pairs) or "gold" (from an imported gold pair;
    # settings_json records {"gold_pair": n, "side": "chosen" | "rejected"} until its task is made).
    kind: Mapped[str] = mapped_column(String(16), default="model")
    model: Mapped[str] = mapped_column(String(500))
    settings_json: Mapped[str] = mapped_column(Text, default="{}")
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("response_a_id", "response_b_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    response_a_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    response_b_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    target: Mapped[int] = mapped_column(Integer)  # annotators wanted (grows on low agreement)
    assigned: Mapped[int] = mapped_column(Integer, default=0)  # live leases + submitted
    submitted: Mapped[int] = mapped_column(Integer, default=0)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    strategy: Mapped[str] = mapped_column(String(32), default="")
    ask_safety: Mapped[bool] = mapped_column(Boolean, default=False)  # schema v2
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Gold(Base):
    """The known answer of a gold task (never sent to annotators)."""

    __tablename__ = "gold"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    answer: Mapped[str] = mapped_column(String(4))  # "a" or "b"
    # off_topic | imported (truncated | shuffled | unsafe: made by alignkit before schema v3)
    kind: Mapped[str] = mapped_column(String(16))


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; token never kept
    role: Mapped[str] = mapped_column(String(16))  # admin | annotator
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "annotator_id"),)  # nobody sees a task twice
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # leased | submitted | expired
    left_is_a: Mapped[bool] = mapped_column(Boolean)
    served_at: Mapped[datetime] = mapped_column(DateTime)
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class Annotation(Base):
    __tablename__ = "annotations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    choice: Mapped[str] = mapped_column(String(4))  # a | b | tie
    confidence: Mapped[int] = mapped_column(Integer)  # 1..5
    reason: Mapped[str] = mapped_column(Text, default="")
    left_is_a: Mapped[bool] = mapped_column(Boolean)
    served_at: Mapped[datetime] = mapped_column(DateTime)
    submitted_at: Mapped[datetime] = mapped_column(DateTime)
    seconds: Mapped[float] = mapped_column(Float)  # server-side, serve to submit
    safer: Mapped[str | None] = mapped_column(String(4), nullable=True)  # schema v2: a | b | same
    a_safe: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # schema v2
    b_safe: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # schema v2
