"""Quality control of preference pairs (seed 002 §4.2.3): every row is kept or rejected with reasons.

Checks, in order (a row collects every reason that applies):

- ``invalid``: the row fails format validation (``alignkit.data.validate``).
- ``degenerate``: chosen identical to rejected (whitespace-insensitive); a response whose share
  of repeated word n-grams exceeds ``max_repeat`` (``1 - distinct/total`` over ``ngram``-grams;
  0 for no repeat); a response that echoes the prompt (it contains the whole prompt and the
  prompt makes up at least ``echo_share`` of its characters).
- ``margin``: a ``margin`` below ``min_margin`` (rows without a margin pass).
- ``agreement``: several rows judging the same pair (same prompt, same two responses in
  either order) are annotators' votes; the minority votes are rejected, and all votes are
  rejected when the majority share is below ``min_agreement``. Krippendorff's alpha (nominal)
  over these pairs is reported.
- ``duplicate``: the same (prompt, chosen, rejected) as an earlier kept row.

Length bias (the share of kept pairs whose chosen response is longer, in characters) is
reported, not filtered: 0.5 means no bias.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.loaders import RawRow
from alignkit.data.tools import krippendorff_alpha, majority_share
from alignkit.data.validate import check_row

__all__ = ["QualityConfig", "QualityReport", "check_pairs", "repeated_ngram_share"]


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of ``check_pairs`` (the CLI flags' defaults)."""

    min_margin: float = 0.0
    ngram: int = 3
    max_repeat: float = 0.5
    echo_share: float = 0.8
    min_agreement: float = 0.6


@dataclass
class QualityReport:
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"row", "reasons", "data"}
    reason_counts: dict[str, int] = field(default_factory=dict)  # rows per kind of reason
    majority_share_mean: float = float("nan")
    krippendorff_alpha: float = float("nan")
    annotated_pairs: int = 0
    length_bias: float = float("nan")

    def summary(self) -> str:
        total = len(self.kept) + len(self.rejected)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reason_counts.items())) or "none"
        agreement = (
            f"{self.annotated_pairs} multiply-labelled pairs: majority share "
            f"{self.majority_share_mean:.3f}, Krippendorff's alpha {self.krippendorff_alpha:.3f}"
            if self.annotated_pairs
            else "no multiply-labelled pairs"
        )
        return (
            f"kept {len(self.kept)} of {total} rows, rejected {len(self.rejected)} "
            f"(reasons: {reasons}); {agreement}; length bias: chosen longer in "
            f"{self.length_bias:.1%} of kept pairs"
        )


def repeated_ngram_share(text: str, n: int) -> float:
    """``1 - distinct / total`` word ``n``-grams of ``text`` (0 when it has fewer than n words)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else ""


def _key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _degenerate(record: dict[str, Any], config: QualityConfig) -> list[str]:
    reasons = []
    if _norm(record["chosen"]) == _norm(record["rejected"]):
        reasons.append("degenerate: chosen identical to rejected")
    prompt = _norm(_prompt_text(record["prompt"]))
    for side in ("chosen", "rejected"):
        text = record[side]
        share = repeated_ngram_share(text, config.ngram)
        if share > config.max_repeat:
            reasons.append(f"degenerate: {side} repeats {config.ngram}-grams ({share:.2f})")
        response = _norm(text)
        if prompt and prompt in response and len(prompt) >= config.echo_share * len(response):
            reasons.append(f"degenerate: {side} echoes the prompt")
    return reasons


def check_pairs(
    raw_rows: list[RawRow], config: QualityConfig, fmt: str = "preference"
) -> QualityReport:
    """Sort every raw row into kept or rejected (with reasons); see the module docstring."""
    reasons: dict[int, list[str]] = {}
    records: dict[int, dict[str, Any]] = {}
    for index, raw in enumerate(raw_rows):
        if raw.error is not None:
            reasons[index] = [f"invalid: {raw.error}"]
            continue
        record, problems = check_row(raw.value, fmt)
        if record is None:
            reasons[index] = [f"invalid: field '{f}': {m}" for f, m in problems]
            if any(m.startswith("identical to") for _, m in problems):
                reasons[index] = ["degenerate: chosen identical to rejected"]
            continue
        records[index] = record
        found = _degenerate(record, config)
        margin = record.get("margin")
        if margin is not None and margin < config.min_margin:
            found.append(f"margin: {margin:g} < {config.min_margin:g}")
        reasons[index] = found

    report = QualityReport()
    # Annotator agreement: votes on the same unordered pair of responses to one prompt.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, record in records.items():
        pair = frozenset((_key(record["chosen"]), _key(record["rejected"])))
        groups[(_key(record["prompt"]), pair)].append(index)
    units, shares = [], []
    for members in groups.values():
        if len(members) < 2:
            continue
        votes = [_key(records[i]["chosen"]) for i in members]
        share = majority_share(votes)
        units.append(votes)
        shares.append(share)
        top = max(set(votes), key=lambda v: (votes.count(v), -votes.index(v)))
        for i, vote in zip(members, votes, strict=True):
            if share < config.min_agreement:
                reasons[i].append(f"agreement: majority share {share:.2f} < {config.min_agreement}")
            elif vote != top:
                reasons[i].append(f"agreement: minority vote (majority share {share:.2f})")
    if units:
        report.annotated_pairs = len(units)
        report.majority_share_mean = sum(shares) / len(shares)
        report.krippendorff_alpha = krippendorff_alpha(units, level="nominal")

    seen: dict[tuple, int] = {}
    for index in sorted(records):
        if reasons[index]:
            continue
        record = records[index]
        key = (_key(record["prompt"]), _key(record["chosen"]), _key(record["rejected"]))
        if key in seen:
            reasons[index].append(f"duplicate: of row {raw_rows[seen[key]].row}")
        else:
            seen[key] = index

    longer = []
    for index, raw in enumerate(raw_rows):
        if reasons[index]:
            report.rejected.append({"row": raw.row, "reasons": reasons[index], "data": raw.value})
            for kind in {reason.split(":", 1)[0] for reason in reasons[index]}:
                report.reason_counts[kind] = report.reason_counts.get(kind, 0) + 1
        else:
            report.kept.append(raw.value)
            record = records[index]
            longer.append(len(record["chosen"]) > len(record["rejected"]))
    if longer:
        report.length_bias = sum(longer) / len(longer)
    return report
