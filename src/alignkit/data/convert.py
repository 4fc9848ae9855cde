"""Convert between preference-data formats (seed 002 §4.2.3), keeping every other column.

=====================  ==============  =================================================
from                   to              rule
=====================  ==============  =================================================
``ratings``            ``preference``  ``ratings_to_pairs``: pairs whose rating gap is at
                                       least ``min_gap``; margin = gap
``pairwise``           ``preference``  preference 1 -> ``response_a`` chosen, 0 ->
                                       ``response_b`` chosen; 0.5 (a tie) dropped and
                                       counted, or kept with margin 0 (``keep_ties``: then
                                       decisive rows without a margin get margin 1, so
                                       every row has one)
``preference``         ``pairwise``    ``response_a`` = chosen, preference 1 (0.5 when
                                       the margin is 0)
``safety`` (PKU)       ``safety``      flattened ``chosen``/``rejected`` by helpfulness,
                       (flattened)     ``*_safety`` scores (``alignkit.data.formats``)
``safety`` (flat)      ``pku``         ``response_0`` = chosen (``better_response_id``
                                       0), the safer response = the higher score
=====================  ==============  =================================================

Round trips are lossless where the formats allow: preference -> pairwise -> preference and
flattened (PKU-scored) -> PKU -> flattened give back the same rows; pairwise -> preference ->
pairwise and PKU -> flattened -> PKU give back the same judgements with the better response
first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignkit.data.tools import ratings_to_pairs
from alignkit.data.validate import ValidatedRow
from alignkit.errors import AlignkitError

__all__ = ["CONVERSIONS", "ConversionResult", "convert_rows"]

_PKU_FIELDS = (
    "prompt",
    "response_0",
    "response_1",
    "better_response_id",
    "safer_response_id",
    "is_response_0_safe",
    "is_response_1_safe",
)
_FLAT_FIELDS = ("prompt", "chosen", "rejected", "chosen_safety", "rejected_safety")


@dataclass
class ConversionResult:
    rows: list[dict[str, Any]]
    dropped_ties: int = 0
    note: str = ""


def _extras(raw: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in known}


def _ratings_to_preference(rows: list[ValidatedRow], **options: Any) -> ConversionResult:
    pairs = ratings_to_pairs(
        [r.record for r in rows],
        min_gap=options["min_gap"],
        max_pairs_per_prompt=options["max_pairs_per_prompt"],
    )
    return ConversionResult(pairs, note=f"{len(pairs)} pairs from {len(rows)} ratings")


def _pairwise_to_preference(rows: list[ValidatedRow], **options: Any) -> ConversionResult:
    out, ties = [], 0
    known = ("prompt", "response_a", "response_b", "preference", "margin")
    for row in rows:
        rec, extras = row.record, _extras(row.raw, known)
        a_wins = rec["preference"] >= 0.5  # a tie keeps the file's order
        pair = {
            "prompt": row.raw["prompt"],
            "chosen": row.raw["response_a" if a_wins else "response_b"],
            "rejected": row.raw["response_b" if a_wins else "response_a"],
        }
        if rec["preference"] == 0.5:
            if not options["keep_ties"]:
                ties += 1
                continue
            pair["margin"] = 0.0
        elif "margin" in row.raw:
            pair["margin"] = row.raw["margin"]
        elif options["keep_ties"]:
            pair["margin"] = 1.0
        out.append(pair | extras)
    note = f"{ties} tie(s) dropped" if ties else ""
    return ConversionResult(out, dropped_ties=ties, note=note)


def _preference_to_pairwise(rows: list[ValidatedRow], **options: Any) -> ConversionResult:
    out = []
    for row in rows:
        tie = row.record.get("margin") == 0.0
        pair = {
            "prompt": row.raw["prompt"],
            "response_a": row.raw["chosen"],
            "response_b": row.raw["rejected"],
            "preference": 0.5 if tie else 1.0,
        }
        extras = _extras(row.raw, ("prompt", "chosen", "rejected"))
        if tie:
            extras.pop("margin")
        out.append(pair | extras)
    return ConversionResult(out)


def _pku_to_safety(rows: list[ValidatedRow], **options: Any) -> ConversionResult:
    out = []
    for row in rows:
        if "response_0" not in row.raw:
            raise AlignkitError(f"row {row.row}: already flattened (no response_0); use --to pku")
        rec = row.record
        flat = {k: rec[k] for k in _FLAT_FIELDS}
        flat["prompt"] = row.raw["prompt"]
        out.append(flat | _extras(row.raw, _PKU_FIELDS))
    return ConversionResult(out)


def _safety_to_pku(rows: list[ValidatedRow], **options: Any) -> ConversionResult:
    out = []
    for row in rows:
        if "response_0" in row.raw:
            raise AlignkitError(f"row {row.row}: already in PKU form; use --to safety")
        rec = row.record
        if rec["chosen_safety"] == rec["rejected_safety"]:
            raise AlignkitError(
                f"row {row.row}: field 'rejected_safety': equal to chosen_safety, so the PKU "
                "format's safer_response_id cannot be set"
            )
        pku = {
            "prompt": row.raw["prompt"],
            "response_0": row.raw["chosen"],
            "response_1": row.raw["rejected"],
            "better_response_id": 0,
            "safer_response_id": 0 if rec["chosen_safety"] > rec["rejected_safety"] else 1,
            "is_response_0_safe": rec["chosen_is_safe"],
            "is_response_1_safe": rec["rejected_is_safe"],
        }
        out.append(pku | _extras(row.raw, _FLAT_FIELDS))
    return ConversionResult(out)


# (from, to) -> (input format for validation, converter)
CONVERSIONS = {
    ("ratings", "preference"): ("ratings", _ratings_to_preference),
    ("pairwise", "preference"): ("pairwise", _pairwise_to_preference),
    ("preference", "pairwise"): ("preference", _preference_to_pairwise),
    ("pku", "safety"): ("safety", _pku_to_safety),
    ("safety", "pku"): ("safety", _safety_to_pku),
}


def convert_rows(
    rows: list[ValidatedRow],
    source: str,
    target: str,
    *,
    min_gap: float = 0.5,
    max_pairs_per_prompt: int | None = None,
    keep_ties: bool = False,
) -> ConversionResult:
    """Convert validated rows from format ``source`` to ``target`` (see the module table)."""
    if (source, target) not in CONVERSIONS:
        known = ", ".join(f"{a}->{b}" for a, b in CONVERSIONS)
        raise AlignkitError(f"no conversion from {source!r} to {target!r}; known: {known}")
    _, converter = CONVERSIONS[(source, target)]
    return converter(
        rows, min_gap=min_gap, max_pairs_per_prompt=max_pairs_per_prompt, keep_ties=keep_ties
    )
