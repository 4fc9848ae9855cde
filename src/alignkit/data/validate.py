"""Validate a whole data file at once: every problem with its 1-based row and field.

Used by ``alignkit data validate`` and by the other data tools to read their input. The
per-row checks are ``alignkit.data.formats.normalize_row``'s; this module adds what needs the
whole row: a preference whose chosen answer is identical to the rejected one, and the
``pairwise`` format of seed 002 §4.2.3 (``{"prompt", "response_a", "response_b",
"preference"}`` with ``preference`` in {0, 0.5, 1}: 1 = ``response_a`` is preferred, 0.5 a tie).

Command-line format names (``preference``, ``safety``, ``ratings``, ...) map to the loader's
(``safety_preference``, ``rating``) through ``FORMAT_ALIASES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.formats import normalize_row
from alignkit.data.loaders import file_kind, read_rows
from alignkit.errors import DataError, RowProblem

__all__ = [
    "FORMAT_ALIASES",
    "ValidatedRow",
    "ValidationReport",
    "check_row",
    "detect_format",
    "load_validated",
    "validate_file",
]

# command-line name -> internal name (pairwise is handled here, not by the loader)
FORMAT_ALIASES = {
    "prompt": "prompt",
    "sft": "sft",
    "preference": "preference",
    "safety": "safety_preference",
    "ratings": "rating",
    "pairwise": "pairwise",
}
PAIRWISE_VALUES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class ValidatedRow:
    """One readable row: its 1-based number, the raw object, its normalised record."""

    row: int
    raw: dict[str, Any]
    record: dict[str, Any]


@dataclass
class ValidationReport:
    """The outcome of validating one file."""

    source: str
    format: str  # the command-line name
    total_rows: int
    rows: list[ValidatedRow] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def bad_rows(self) -> int:
        return len({p.row for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.source}: {self.total_rows} rows, format {self.format}, no problems"
        return (
            f"{self.source}: {len(self.problems)} problem(s) in {self.bad_rows} of "
            f"{self.total_rows} rows (format {self.format})"
        )


def _pairwise_row(raw: Mapping[str, Any], text_cells: bool) -> tuple[dict | None, list]:
    # Reuse the preference checks with the fields renamed, then check the preference value.
    renamed = {
        k: v for k, v in raw.items() if k not in ("chosen", "rejected", "margin", "preference")
    }
    for src, dst in (("response_a", "chosen"), ("response_b", "rejected")):
        if src in raw:
            renamed[dst] = raw[src]
    record, problems = normalize_row(renamed, "preference", text_cells)
    back = {"chosen": "response_a", "rejected": "response_b"}
    problems = [(back.get(f, f), m) for f, m in problems]
    value = raw.get("preference")
    if text_cells and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if "preference" not in raw:
        problems.append(("preference", "missing field"))
    elif (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or float(value) not in PAIRWISE_VALUES
    ):
        problems.append(("preference", f"expected 0, 0.5 or 1, got {value!r}"))
    if problems:
        return None, problems
    assert record is not None
    return {
        "prompt": record["prompt"],
        "response_a": record["chosen"],
        "response_b": record["rejected"],
        "preference": float(value),
    }, []


def _same_text(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and " ".join(a.split()) == " ".join(b.split())


def check_row(raw: Any, fmt: str, text_cells: bool = False) -> tuple[dict | None, list]:
    """Validate one raw row in command-line format ``fmt``: ``(record | None, [(field, msg)])``."""
    internal = FORMAT_ALIASES[fmt]
    if internal == "pairwise":
        if not isinstance(raw, Mapping):
            return normalize_row(raw, "prompt", text_cells)  # the loader's "expected an object"
        record, problems = _pairwise_row(raw, text_cells)
        pair = ("response_a", "response_b")
    else:
        record, problems = normalize_row(raw, internal, text_cells)
        pair = ("chosen", "rejected")
        if internal == "safety_preference" and isinstance(raw, Mapping) and "response_0" in raw:
            pair = ("response_0", "response_1")
    if record is not None and internal in ("preference", "safety_preference", "pairwise"):
        source = raw if pair[0] == "response_0" else record
        if _same_text(source.get(pair[0]), source.get(pair[1])):
            return None, [(pair[1], f"identical to {pair[0]}")]
    return record, problems


def detect_format(raw_values: list[Any]) -> str | None:
    """Guess the command-line format from the keys of the first object row (None: no object)."""
    for value in raw_values:
        if not isinstance(value, Mapping):
            continue
        keys = set(value)
        if keys & {"response_0", "response_1", "chosen_safety", "rejected_safety"}:
            return "safety"
        if keys & {"response_a", "response_b"}:
            return "pairwise"
        if keys & {"chosen", "rejected"}:
            return "preference"
        if "rating" in keys or "response" in keys:
            return "ratings"
        if keys & {"messages", "completion"}:
            return "sft"
        return "prompt"
    return None


def validate_file(path: str | Path, fmt: str | None = None) -> ValidationReport:
    """Check every row of ``path``; the report holds all problems and the valid rows.

    Raises ``DataError`` only for a problem with the whole file (missing, unreadable type).
    """
    path = Path(path)
    text_cells = file_kind(path) in ("csv", "tsv")
    raw_rows = read_rows(path)
    if fmt is None:
        fmt = detect_format([r.value for r in raw_rows if r.error is None]) or "prompt"
    if fmt not in FORMAT_ALIASES:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMAT_ALIASES)}")
    report = ValidationReport(str(path), fmt, len(raw_rows))
    if not raw_rows:
        report.problems.append(RowProblem(str(path), 0, "<file>", "no records"))
    for raw in raw_rows:
        if raw.error is not None:
            report.problems.append(RowProblem(str(path), raw.row, "<row>", raw.error))
            continue
        record, problems = check_row(raw.value, fmt, text_cells)
        report.problems.extend(RowProblem(str(path), raw.row, f, m) for f, m in problems)
        if record is not None and not problems:
            report.rows.append(ValidatedRow(raw.row, dict(raw.value), record))
    if FORMAT_ALIASES[fmt] == "preference":
        # as the loader: a file cannot mix pairs with and without a margin
        with_margin = sum("margin" in r.record for r in report.rows)
        if 0 < with_margin < len(report.rows):
            message = f"missing here but given in {with_margin} other rows"
            report.problems.extend(
                RowProblem(str(path), r.row, "margin", message)
                for r in report.rows
                if "margin" not in r.record
            )
            report.rows = [r for r in report.rows if "margin" in r.record]
    report.problems.sort(key=lambda p: p.row)
    return report


def load_validated(path: str | Path, fmt: str | None = None) -> ValidationReport:
    """``validate_file``, raising one ``DataError`` listing every problem when there is any."""
    report = validate_file(path, fmt)
    if not report.ok:
        note = f"format {report.format!r}"
        raise DataError(report.problems[:20], total=len(report.problems), note=note)
    return report
