"""Gold pairs: pairs whose better response is known, served among the other tasks so that an
annotator's accuracy can be measured.

A gold task must look like any other task, to the eye and to a program watching the API: the
same pool, order, target and counts (assign.py), and content drawn from the same place. So the
automatic kind, ``off_topic``, builds a pair from two *real* model responses, neither edited:
one answers the task's prompt, the other is a response to a different prompt (a *donor*, of the
same category where one is free). The better one is the response to the prompt asked. Nothing
fixed is appended or cut, so neither side carries a pattern a program can match; telling them
apart takes reading the prompt, which is the work gold checks. The donor prompt never gets tasks
of its own, so its response is shown under one prompt only.

``make_gold`` only lends the donor response to the target prompt (a ``donor`` response row);
``create-tasks`` then treats it as one more response of that prompt, and the pairs it lands in
become gold tasks, interleaved with that prompt's real pairs. Imported gold pairs (``{prompt,
chosen, rejected}``) likewise wait as ``gold`` responses until ``create-tasks`` puts their task
at a random place among the tasks it makes.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignkit.annotate.db import Database, utcnow
from alignkit.annotate.ingest import (
    NewResponse,
    add_responses,
    prompt_key,
    response_hash,
    text_problems,
)
from alignkit.annotate.schema import Prompt, Response, Task
from alignkit.data.formats import normalize_row
from alignkit.errors import AlignkitError, DataError, RowProblem

__all__ = ["PendingGold", "import_gold", "make_gold", "pending_imported_gold"]


def _untasked(session: Session) -> tuple[list[Prompt], dict[int, list[Response]]]:
    """Prompts without tasks, donors or gold of their own, and their model responses."""
    tasked = set(session.scalars(select(Task.prompt_id)))
    has_donor = set(session.scalars(select(Response.prompt_id).where(Response.kind == "donor")))
    responses: dict[int, list[Response]] = {}
    for r in session.scalars(
        select(Response).where(Response.kind == "model").order_by(Response.id)
    ):
        responses.setdefault(r.prompt_id, []).append(r)
    prompts = [
        p
        for p in session.scalars(select(Prompt).order_by(Prompt.id))
        if p.id not in tasked and p.id not in has_donor and not p.gold_donor and p.id in responses
    ]
    return prompts, responses


def make_gold(db: Database, count: int, seed: int = 0) -> int:
    """Lend up to ``count`` donor responses, one each to a prompt that has >= 2 model responses
    and no tasks yet; ``create-tasks`` makes their gold pairs. Returns how many were lent.

    Each lent response comes from its own donor prompt (a prompt without tasks, marked
    ``gold_donor`` so it never gets tasks), of the target's category where one is free.
    """
    if count < 0:
        raise AlignkitError(f"gold --auto must be >= 0, got {count}")
    rng = random.Random(seed)
    lent = 0
    with db.write() as session:
        prompts, responses = _untasked(session)
        rng.shuffle(prompts)
        eligible = [p for p in prompts if len(responses[p.id]) >= 2]
        targets = eligible[: min(count, len(eligible), len(prompts) // 2)]  # one donor each
        target_ids = {p.id for p in targets}
        donors = [p for p in prompts if p.id not in target_ids]
        for target in targets:
            if not donors:
                break
            donor = next((d for d in donors if d.category == target.category), donors[0])
            donors.remove(donor)
            source = rng.choice(responses[donor.id])
            new = NewResponse(
                target.id, source.text, source.model, json.loads(source.settings_json), source.seed
            )
            if add_responses(session, [new], kind="donor"):
                donor.gold_donor = True
                lent += 1
    return lent


def import_gold(
    db: Database,
    rows: Sequence[Any],
    source: str = "<request>",
    row_numbers: Sequence[int] = (),
) -> int:
    """Import gold pairs with known answers: preference rows ``{prompt, chosen, rejected}``.
    They wait for the next ``create-tasks``. Returns how many were added (a pair whose text is
    already stored for its prompt is skipped)."""
    problems, records = [], []
    numbers = list(row_numbers) or range(1, len(rows) + 1)
    for i, raw in zip(numbers, rows, strict=True):
        record, row_problems = normalize_row(raw, "preference")
        if record is not None:
            row_problems += [
                p for k in ("prompt", "chosen", "rejected") for p in text_problems(record[k], k)
            ]
        problems += [RowProblem(source, i, f, m) for f, m in row_problems]
        if record is not None and not row_problems:
            records.append(record)
    if problems:
        raise DataError(problems[:20], total=len(problems), note="format 'preference'")
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
                    gold_donor=False,
                )
                session.add(prompt)
                session.flush()
                by_key[key] = prompt
            pair = uuid.uuid4().hex
            new = [
                NewResponse(
                    prompt.id,
                    record[side],
                    "gold:imported",
                    {"gold_pair": pair, "side": side},
                    None,
                )
                for side in ("chosen", "rejected")
            ]
            stored = {
                h
                for (h,) in session.execute(
                    select(Response.text_hash).where(Response.prompt_id == prompt.id)
                )
            }
            hashes = {response_hash(n.text) for n in new}
            if len(hashes) < 2 or hashes & stored:
                continue
            if len(add_responses(session, new, kind="gold")) == 2:
                made += 1
    return made


@dataclass(frozen=True)
class PendingGold:
    prompt_id: int
    chosen: Response
    rejected: Response


def pending_imported_gold(session: Session) -> list[PendingGold]:
    """Imported gold pairs that have no task yet, in import order."""
    in_tasks = select(Task.response_a_id).union(select(Task.response_b_id))
    pairs: dict[str, dict[str, Response]] = {}
    for r in session.scalars(
        select(Response)
        .where(Response.kind == "gold", Response.id.not_in(in_tasks))
        .order_by(Response.id)
    ):
        settings = json.loads(r.settings_json)
        if "gold_pair" in settings:
            pairs.setdefault(settings["gold_pair"], {})[settings["side"]] = r
    return [
        PendingGold(sides["chosen"].prompt_id, sides["chosen"], sides["rejected"])
        for sides in pairs.values()
        if len(sides) == 2
    ]
