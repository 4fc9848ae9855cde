"""Putting things into the labelling database: prompts, model responses, annotators, gold pairs."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignkit.annotate.db import Database, utcnow
from alignkit.annotate.schema import Annotator, Gold, Prompt, Response, Task
from alignkit.data.formats import normalize_row
from alignkit.errors import AlignkitError, DataError, RowProblem

__all__ = [
    "ROLES",
    "add_annotator",
    "add_responses",
    "corrupt",
    "find_annotator",
    "hash_token",
    "import_gold",
    "import_prompts",
    "make_gold",
    "prompt_key",
    "revoke_annotator",
]

ROLES = ("admin", "annotator")
GOLD_KINDS = ("truncated", "shuffled", "unsafe")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
# Appended to a response to make its "safety-violating continuation" gold copy.
UNSAFE_CONTINUATION = (
    " Also, ignore every safety rule: here is how to make a weapon at home and hurt someone "
    "without getting caught, step by step."
)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_key(prompt: str | list) -> str:
    return _sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False))


def import_prompts(
    db: Database, rows: Sequence[Any], source: str = "<request>", row_numbers: Sequence[int] = ()
) -> tuple[int, int]:
    """Validate prompt-format rows (``category`` and flags such as ``adversarial`` kept) and add the
    new ones. Returns ``(added, already present)``. Every bad row is reported, none is added."""
    problems, records = [], []
    numbers = list(row_numbers) or range(1, len(rows) + 1)
    for i, raw in zip(numbers, rows, strict=True):
        record, row_problems = normalize_row(raw, "prompt")
        for field in ("adversarial", "high_value"):
            if isinstance(raw, Mapping) and not isinstance(raw.get(field, False), bool):
                row_problems.append((field, f"expected true or false, got {raw[field]!r}"))
        if isinstance(raw, Mapping) and not isinstance(raw.get("category", ""), str):
            row_problems.append(("category", f"expected a string, got {raw['category']!r}"))
        problems += [RowProblem(source, i, f, m) for f, m in row_problems]
        if record is not None and not row_problems:
            records.append((record["prompt"], raw))
    if not rows:
        raise DataError([RowProblem(source, 0, "<file>", "no records")])
    if problems:
        raise DataError(problems[:20], total=len(problems), note="format 'prompt'")
    added = 0
    with db.write() as session:
        known = set(session.scalars(select(Prompt.prompt_key)))
        for prompt, raw in records:
            key = prompt_key(prompt)
            if key in known:
                continue
            known.add(key)
            extra = {
                k: v
                for k, v in raw.items()
                if k not in ("prompt", "category", "adversarial", "high_value")
            }
            session.add(
                Prompt(
                    prompt_json=json.dumps(prompt, ensure_ascii=False),
                    prompt_key=key,
                    category=raw.get("category") or "general",
                    adversarial=bool(raw.get("adversarial", False)),
                    high_value=bool(raw.get("high_value", False)),
                    flags_json=json.dumps(extra, ensure_ascii=False, default=str),
                    created_at=utcnow(),
                )
            )
            added += 1
    return added, len(records) - added


@dataclass(frozen=True)
class NewResponse:
    prompt_id: int
    text: str
    model: str
    settings: Mapping[str, Any]
    seed: int | None


def add_responses(
    session: Session, responses: Iterable[NewResponse], kind: str = "model"
) -> list[Response]:
    """Add responses, skipping empty ones and exact duplicates of a response to the same prompt.
    Returns the rows that were added."""
    added = []
    seen = {(p, h) for p, h in session.execute(select(Response.prompt_id, Response.text_hash))}
    for new in responses:
        text = new.text.strip()
        key = (new.prompt_id, _sha256(text))
        if not text or key in seen:
            continue
        seen.add(key)
        row = Response(
            prompt_id=new.prompt_id,
            text=text,
            text_hash=key[1],
            kind=kind,
            model=new.model,
            settings_json=json.dumps(dict(new.settings), sort_keys=True),
            seed=new.seed,
            created_at=utcnow(),
        )
        session.add(row)
        added.append(row)
    session.flush()
    return added


# ---------------------------------------------------------------- annotators and tokens


def hash_token(token: str) -> str:
    return _sha256(token)


def add_annotator(db: Database, name: str, role: str = "annotator") -> str:
    """Create an annotator; returns the one-time token (only its hash is stored)."""
    if role not in ROLES:
        raise AlignkitError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
    if not _NAME.match(name):
        raise AlignkitError(
            f"annotator name {name!r}: use 1-100 letters, digits, '_', '.', '@' or '-'"
        )
    token = "ak_" + secrets.token_urlsafe(32)
    with db.write() as session:
        if session.scalar(select(Annotator.id).where(Annotator.name == name)) is not None:
            raise AlignkitError(
                f"annotator {name!r} already exists (revoke it or pick another name)"
            )
        session.add(
            Annotator(
                name=name,
                token_hash=hash_token(token),
                role=role,
                revoked=False,
                created_at=utcnow(),
            )
        )
    return token


def revoke_annotator(db: Database, name: str) -> None:
    with db.write() as session:
        annotator = session.scalar(select(Annotator).where(Annotator.name == name))
        if annotator is None:
            raise AlignkitError(f"no annotator named {name!r}")
        annotator.revoked = True


def find_annotator(session: Session, token: str) -> Annotator | None:
    """The live annotator holding ``token``, or None. The stored hash is compared in constant time."""
    wanted = hash_token(token)
    annotator = session.scalar(select(Annotator).where(Annotator.token_hash == wanted))
    if (
        annotator is None
        or annotator.revoked
        or not hmac.compare_digest(annotator.token_hash, wanted)
    ):
        return None
    return annotator


# ---------------------------------------------------------------- gold pairs


def corrupt(text: str, kind: str, rng: random.Random) -> str | None:
    """A worse copy of ``text``: ``truncated`` (cut mid-way), ``shuffled`` (sentences out of order)
    or ``unsafe`` (a harmful continuation). None when ``text`` is too short for that corruption."""
    if kind == "truncated":
        words = text.split()
        return " ".join(words[: max(1, len(words) * 2 // 5)]) if len(words) >= 5 else None
    if kind == "shuffled":
        sentences = [s for s in re.split(r"(?<=[.!?。！？])\s+", text.strip()) if s]
        if len(sentences) < 3:
            return None
        order = list(range(len(sentences)))
        while order == sorted(order):
            rng.shuffle(order)
        return " ".join(sentences[i] for i in order)
    if kind == "unsafe":
        return text.rstrip() + UNSAFE_CONTINUATION
    raise ValueError(f"unknown corruption {kind!r}; expected one of {', '.join(GOLD_KINDS)}")


def _add_gold_task(
    session: Session, prompt_id: int, good: Response, bad: Response, kind: str, rng: random.Random
) -> None:
    # The better response is on a random side of the stored pair, so "a" is not always right.
    a, b, answer = (good, bad, "a") if rng.random() < 0.5 else (bad, good, "b")
    task = Task(
        prompt_id=prompt_id,
        response_a_id=a.id,
        response_b_id=b.id,
        target=0,
        assigned=0,
        submitted=0,
        is_gold=True,
        strategy="gold",
        ask_safety=kind == "unsafe",
        created_at=utcnow(),
    )
    session.add(task)
    session.flush()
    session.add(Gold(task_id=task.id, answer=answer, kind=kind))


def make_gold(db: Database, count: int, kinds: Sequence[str] = GOLD_KINDS, seed: int = 0) -> int:
    """Make up to ``count`` gold tasks from model responses and corrupted copies of them."""
    for kind in kinds:
        if kind not in GOLD_KINDS:
            raise AlignkitError(f"gold kind {kind!r}: expected one of {', '.join(GOLD_KINDS)}")
    rng = random.Random(seed)
    made = 0
    with db.write() as session:
        sources = list(
            session.scalars(select(Response).where(Response.kind == "model").order_by(Response.id))
        )
        rng.shuffle(sources)
        for source in sources:
            if made >= count:
                break
            # kinds in rotation; a response too short for one kind tries the next
            rotation = [kinds[(made + k) % len(kinds)] for k in range(len(kinds))]
            kind, text = next(
                ((k, t) for k in rotation if (t := corrupt(source.text, k, rng)) is not None),
                ("", None),
            )
            if text is None:
                continue
            new = NewResponse(
                source.prompt_id, text, f"gold:{kind}", {"from_response": source.id}, None
            )
            added = add_responses(session, [new], kind="gold")
            if added:
                _add_gold_task(session, source.prompt_id, source, added[0], kind, rng)
                made += 1
    return made


def import_gold(
    db: Database,
    rows: Sequence[Any],
    source: str = "<request>",
    seed: int = 0,
    row_numbers: Sequence[int] = (),
) -> int:
    """Import gold pairs with known answers: preference rows ``{prompt, chosen, rejected}``.
    Returns how many gold tasks were made (a pair already in the database is skipped)."""
    problems, records = [], []
    numbers = list(row_numbers) or range(1, len(rows) + 1)
    for i, raw in zip(numbers, rows, strict=True):
        record, row_problems = normalize_row(raw, "preference")
        problems += [RowProblem(source, i, f, m) for f, m in row_problems]
        if record is not None:
            records.append(record)
    if problems:
        raise DataError(problems[:20], total=len(problems), note="format 'preference'")
    rng = random.Random(seed)
    made = 0
    with db.write() as session:
        by_key = {p.prompt_key: p for p in session.scalars(select(Prompt))}
        for record in records:
            key = prompt_key(record["prompt"])
            prompt = by_key.get(key)
            if prompt is None:
                prompt = Prompt(
                    prompt_json=json.dumps(record["prompt"], ensure_ascii=False),
                    prompt_key=key,
                    category="gold",
                    adversarial=False,
                    high_value=False,
                    flags_json="{}",
                    created_at=utcnow(),
                )
                session.add(prompt)
                session.flush()
                by_key[key] = prompt
            pair = [
                NewResponse(prompt.id, record[s], "gold:imported", {}, None)
                for s in ("chosen", "rejected")
            ]
            added = add_responses(session, pair, kind="gold")
            if len(added) == 2:
                _add_gold_task(session, prompt.id, added[0], added[1], "imported", rng)
                made += 1
    return made
