"""Active selection of pairs to label: the ones a reward-model ensemble is least sure of.

Candidates are pairs of responses to a prompt, as ``{"prompt", "chosen", "rejected"}`` or
``{"prompt", "response_a", "response_b"}`` (a preference, if present, is ignored). Each
member k scores both responses; from the margins ``d[k] = r_k(a) - r_k(b)`` the uncertainty
is ``std`` (disagreement in reward units), ``variance_ratio`` (disagreement of the votes) or
``entropy`` (of the mean preference probability; also high when all members say 50/50), see
``alignkit.ops.evaluation.pair_uncertainty``. The ``budget`` most uncertain pairs are
returned, most uncertain first, each with its ``uncertainty``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor

from alignkit.data.formats import normalize_row
from alignkit.data.loaders import RawRow
from alignkit.errors import DataError, RowProblem
from alignkit.ops.evaluation import pair_uncertainty

__all__ = ["MemberScorer", "candidate_pairs", "select_uncertain"]


class MemberScorer(Protocol):
    def member_scores(self, prompts: Sequence[Any], responses: Sequence[str]) -> Tensor: ...


def candidate_pairs(raw_rows: list[RawRow], source: str) -> list[tuple[dict, dict]]:
    """``(raw row, {"prompt", "a", "b"})`` for every row; one ``DataError`` lists all bad rows."""
    out, problems = [], []
    for raw in raw_rows:
        if raw.error is not None:
            problems.append(RowProblem(source, raw.row, "<row>", raw.error))
            continue
        value = raw.value if isinstance(raw.value, dict) else {}
        names = ("response_a", "response_b") if "response_a" in value else ("chosen", "rejected")
        renamed = {"prompt": value.get("prompt"), "chosen": value.get(names[0])}
        renamed["rejected"] = value.get(names[1])
        renamed = {k: v for k, v in renamed.items() if v is not None}
        record, row_problems = normalize_row(raw.value if not value else renamed, "preference")
        back = {"chosen": names[0], "rejected": names[1]}
        problems.extend(RowProblem(source, raw.row, back.get(f, f), m) for f, m in row_problems)
        if record is not None:
            pair = {"prompt": record["prompt"], "a": record["chosen"], "b": record["rejected"]}
            out.append((raw.value, pair))
    if problems:
        raise DataError(problems[:20], total=len(problems), note="candidate pairs")
    return out


def select_uncertain(
    scorer: MemberScorer,
    candidates: list[tuple[dict, dict]],
    budget: int,
    measure: str = "std",
) -> list[dict[str, Any]]:
    """The ``budget`` candidates of highest uncertainty, most uncertain first (ties: file order)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    prompts = [pair["prompt"] for _, pair in candidates]
    margins = scorer.member_scores(prompts, [p["a"] for _, p in candidates]) - scorer.member_scores(
        prompts, [p["b"] for _, p in candidates]
    )
    uncertainty = pair_uncertainty(margins, measure)
    order = sorted(range(len(candidates)), key=lambda i: (-float(uncertainty[i]), i))
    return [
        dict(candidates[i][0]) | {"uncertainty": round(float(uncertainty[i]), 6)}
        for i in order[:budget]
    ]
