"""`annotate export`: one training row per labelled task, in alignkit's preference format
(``alignkit train dpo`` reads it as it is) or, with ``safety=True``, the flattened
safety-preference format Safe-DPO reads. Vote weights: aggregate.py; the tie policy: quality.py.

The report says when the evidence is thin: no gold in the round, annotators with fewer than
``min_gold`` gold answers, annotators given no weight, and rows that rest only on annotators
without any evidence of accuracy (their weight is the prior's).

Safety scores (higher is safer; its sign is the weighted-majority safe label, as formats.py reads
``*_is_safe = safety >= 0``)::

    safety(x) = (+1 if P_w(x safe) >= 0.5 else -1) + 0.5 * (P_w(x safer) - P_w(other safer))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from alignkit.annotate.db import Database
from alignkit.annotate.limits import check_number
from alignkit.annotate.quality import Collected, QualityConfig, TaskResult, aggregate, collect
from alignkit.annotate.schema import Prompt, Response

__all__ = ["ExportReport", "export_rows", "write_export"]


@dataclass(frozen=True)
class ExportReport:
    rows: int
    ties_dropped: int  # all ties, votes that cancel, margin <= tie_margin
    below_agreement: int
    too_few_labels: int
    no_safety_answers: int
    no_weight: int = 0  # every label's annotator has weight 0
    without_evidence: int = 0  # rows resting only on annotators with no evidence of accuracy
    warnings: tuple[str, ...] = ()


def _warnings(data: Collected, rows_without_evidence: int, min_gold: int) -> list[str]:
    labelled = {a.annotator_id for r in data.tasks.values() for a in r.labels}
    names = lambda ids: ", ".join(sorted(data.annotators[i].name for i in ids))  # noqa: E731
    found = []
    if data.gold_tasks == 0:
        found.append(
            "the round has no gold pairs: weights rest on agreement alone "
            "(`alignkit annotate gold --auto N` before create-tasks adds them)"
        )
    thin = [i for i in labelled if data.estimates[i].gold_answered < min_gold]
    if data.gold_tasks and thin:
        found.append(f"fewer than {min_gold} gold answers: {names(thin)}")
    if zero := [i for i in labelled if data.estimates[i].weight == 0]:
        found.append(f"no weight (at or below chance): {names(zero)}")
    if rows_without_evidence:
        found.append(
            f"{rows_without_evidence} rows rest only on annotators without evidence of accuracy "
            "(no gold answers, no label shared with others)"
        )
    return found


def _safety(result: TaskResult, side: str) -> float:
    other = "b" if side == "a" else "a"
    safe = result.weighted_share(f"{side}_safe", True)
    safer = result.weighted_share("safer", side) - result.weighted_share("safer", other)
    return (1.0 if safe >= 0.5 else -1.0) + 0.5 * safer


def export_rows(
    db: Database,
    *,
    safety: bool = False,
    min_labels: int = 1,
    min_agreement: float = 0.0,
    tie_margin: float = 0.0,
    quality: QualityConfig | None = None,
) -> tuple[list[dict[str, Any]], ExportReport]:
    """The export rows (tasks in id order) and what was left out and why."""
    check_number("min_labels", min_labels, 1, integer=True)
    check_number("min_agreement", min_agreement, 0, 1)
    check_number("tie_margin", tie_margin, 0, 1, low_open=False)
    quality = quality or QualityConfig()
    data = collect(db, quality)
    with db.read() as session:
        prompts = {p.id: json.loads(p.prompt_json) for p in session.scalars(select(Prompt))}
        responses = {r.id: r for r in session.scalars(select(Response))}
    rows: list[dict[str, Any]] = []
    ties = low = few = unsafe_missing = unweighted = bare = 0
    for task_id in sorted(data.tasks):
        result = data.tasks[task_id]
        if len(result.labels) < min_labels:
            few += 1
            continue
        if sum(result.votes) == 0:
            unweighted += 1
            continue
        if result.weighted_agreement < min_agreement:
            low += 1
            continue
        winner = aggregate(result, tie_margin)
        if winner is None:
            ties += 1
            continue
        task = result.task
        a, b = responses[task.response_a_id], responses[task.response_b_id]
        chosen, rejected = (a, b) if winner == "a" else (b, a)
        row: dict[str, Any] = {
            "prompt": prompts[task.prompt_id],
            "chosen": chosen.text,
            "rejected": rejected.text,
            "margin": round(result.margin, 6),
        }
        if safety:
            if not task.ask_safety or any(x.a_safe is None for x in result.labels):
                unsafe_missing += 1
                continue
            loser = "b" if winner == "a" else "a"
            row.pop("margin")
            row["chosen_safety"] = round(_safety(result, winner), 6)
            row["rejected_safety"] = round(_safety(result, loser), 6)
        voters = {x.annotator_id for x, w in zip(result.labels, result.votes, strict=True) if w > 0}
        evidence = sum(data.estimates[i].evidence for i in voters)
        bare += evidence == 0
        row["provenance"] = {
            "task_id": task.id,
            "annotators": len(result.labels),
            "agreement": round(result.agreement, 6),
            "weighted_agreement": round(result.weighted_agreement, 6),
            "p_chosen": round(max(result.posterior, 1 - result.posterior), 6),
            "evidence_labels": evidence,
            "chosen_source": {
                "model": chosen.model,
                "settings": json.loads(chosen.settings_json),
                "seed": chosen.seed,
            },
            "rejected_source": {
                "model": rejected.model,
                "settings": json.loads(rejected.settings_json),
                "seed": rejected.seed,
            },
            "tie_policy": f"dropped when margin <= {tie_margin}",
        }
        rows.append(row)
    report = ExportReport(
        len(rows),
        ties,
        low,
        few,
        unsafe_missing,
        no_weight=unweighted,
        without_evidence=bare,
        warnings=tuple(_warnings(data, bare, quality.min_gold)),
    )
    return rows, report


def write_export(db: Database, out: str | Path, **options: Any) -> ExportReport:
    """Write the export as JSONL, atomically (readers see the old file or the whole new one)."""
    # imported here: alignkit.tracking imports torch, which `annotate serve` never needs (its
    # start took seconds longer with it)
    from alignkit.config import atomic_write_text

    rows, report = export_rows(db, **options)
    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return report
