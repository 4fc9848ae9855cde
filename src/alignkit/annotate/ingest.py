"""Putting things into the labelling database: prompts, model responses, annotators and their
tokens. Gold pairs: gold.py."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignkit.annotate.assign import release_leases
from alignkit.annotate.db import Database, utcnow
from alignkit.annotate.schema import Annotator, Prompt, Response
from alignkit.data.formats import normalize_row
from alignkit.errors import AlignkitError, DataError, RowProblem

__all__ = [
    "ROLES",
    "add_annotator",
    "add_responses",
    "find_annotator",
    "hash_token",
    "import_prompts",
    "prompt_key",
    "response_hash",
    "revoke_annotator",
    "rotate_token",
    "text_problem",
    "text_problems",
]

ROLES = ("admin", "annotator")
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,100}")  # fullmatch: "eve\n" is not a name
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as it is on both backends, or None. A lone UTF-16 surrogate
    (JSON ``"\\ud800"``) is not Unicode text and cannot be encoded; PostgreSQL text cannot hold
    a NUL character."""
    if (found := _SURROGATE.search(text)) is not None:
        return f"contains a lone surrogate (\\u{ord(found.group()):04x}), which is not valid Unicode text"
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    return None


def text_problems(value: Any, field: str) -> list[tuple[str, str]]:
    """``(field, problem)`` for every string inside ``value`` (nested lists and dicts, keys too)."""
    if isinstance(value, str):
        problem = text_problem(value)
        return [] if problem is None else [(field, problem)]
    if isinstance(value, Mapping):
        found = []
        for key, item in value.items():
            found += text_problems(key, field) + text_problems(item, f"{field}.{key}")
        return found
    if isinstance(value, list | tuple):
        return [p for i, item in enumerate(value) for p in text_problems(item, f"{field}[{i}]")]
    return []


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
        if isinstance(raw, Mapping):
            row_problems += [p for k, v in raw.items() for p in text_problems(v, str(k))]
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


def _stored_text(text: str) -> str:
    # model output is stored whatever it holds: characters no backend can store become U+FFFD
    return _SURROGATE.sub("\ufffd", text.strip()).replace("\x00", "\ufffd")


def response_hash(text: str) -> str:
    """The key of a response's text among its prompt's responses (duplicates are dropped)."""
    return _sha256(_stored_text(text))


def add_responses(
    session: Session, responses: Iterable[NewResponse], kind: str = "model"
) -> list[Response]:
    """Add responses, skipping empty ones and exact duplicates of a response to the same prompt.
    Returns the rows that were added."""
    added = []
    seen = {(p, h) for p, h in session.execute(select(Response.prompt_id, Response.text_hash))}
    for new in responses:
        text = _stored_text(new.text)
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
    if not _NAME.fullmatch(name):
        raise AlignkitError(
            f"annotator name {name!r}: use 1-100 letters, digits, '_', '.', '@' or '-'"
        )
    token = "ak_" + secrets.token_urlsafe(32)
    with db.write() as session:
        if session.scalar(select(Annotator.id).where(Annotator.name == name)) is not None:
            raise AlignkitError(
                f"annotator {name!r} already exists (`alignkit annotate rotate-token {name}` "
                "gives it a new token)"
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


def _named(session: Session, name: str) -> Annotator:
    annotator = session.scalar(select(Annotator).where(Annotator.name == name))
    if annotator is None:
        raise AlignkitError(f"no annotator named {name!r}")
    return annotator


def revoke_annotator(db: Database, name: str) -> int:
    """Disable ``name``'s token at once and put its live lease back in the pool (another
    annotator gets the task). Returns the number of leases released."""
    with db.write() as session:
        annotator = _named(session, name)
        annotator.revoked = True
        return release_leases(session, annotator.id)


def rotate_token(db: Database, name: str) -> tuple[str, bool]:
    """A new token for ``name`` (the old one stops working; a revoked annotator is reinstated);
    its labels and gold record stay. Its live lease goes back to the pool, since whoever held
    the old token may have held it. Returns ``(token, was revoked)``."""
    token = "ak_" + secrets.token_urlsafe(32)
    with db.write() as session:
        annotator = _named(session, name)
        was_revoked = annotator.revoked
        annotator.token_hash, annotator.revoked = hash_token(token), False
        release_leases(session, annotator.id)
    return token, was_revoked


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
