"""Evaluate a reward model, a cost model or an ensemble on held-out data (seed 002 §4.3.6).

Pairs are ``(better, worse)``: for a reward model, ``chosen`` and ``rejected``; for a cost
model on safety data, the safer and the less safe response (pairs of equal safety are left
out), scored by ``-cost`` so that "higher is better" holds for both. From ratings data
(``{"prompt", "response", "rating"}``), pairs come from ``ratings_to_pairs`` and prompts with
three or more rated responses are ranking groups for Kendall's tau.

Metrics: pairwise accuracy (ties half), accuracy by margin bucket (the data's margins, split
at their terciles), Kendall's tau per ranking group (mean), calibration (ECE of
``sigmoid(s_better - s_worse)`` over both orientations of each pair, reliability diagram), robustness (accuracy under
perturbations that should not change the preference: whitespace, casing, appended neutral
text, response order in the batch), the margin histogram, the Pearson correlation of the
score with the response length in characters, and for an ensemble each member's accuracy, the
members' mean std and the mean pair uncertainty (std, variance ratio, entropy).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.data.tools import ratings_to_pairs
from alignkit.errors import DataError, RowProblem
from alignkit.models.ensemble import RewardEnsemble
from alignkit.ops.evaluation import (
    UNCERTAINTIES,
    calibration_bins,
    expected_calibration_error,
    kendall_tau,
    pair_uncertainty,
)
from alignkit.ops.stats import pairwise_accuracy

__all__ = ["PERTURBATIONS", "EvalPairs", "evaluate_reward_model", "pairs_from_records"]

NEUTRAL_SUFFIX = " Thank you for reading."
PERTURBATIONS: dict[str, Callable[[str], str]] = {
    "whitespace": lambda text: "  " + "  ".join(text.split(" ")) + "\n",
    "casing": str.upper,
    "appended_text": lambda text: text + NEUTRAL_SUFFIX,
}


@dataclass
class EvalPairs:
    prompts: list[Any]
    better: list[str]
    worse: list[str]
    margins: list[float] | None  # the data's margins (None when it has none)
    groups: list[tuple[Any, list[str], list[float]]]  # (prompt, responses, ratings), >= 3 each


def pairs_from_records(records: Sequence[dict], fmt: str, kind: str, source: str) -> EvalPairs:
    """Build ``EvalPairs`` from validated records of ``preference``, ``safety`` or ``ratings``."""
    if fmt == "ratings":
        by_prompt: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_prompt[repr(r["prompt"])].append(r)
        groups = [
            (rows[0]["prompt"], [r["response"] for r in rows], [r["rating"] for r in rows])
            for rows in by_prompt.values()
            if len(rows) >= 3
        ]
        records = ratings_to_pairs(records, min_gap=1e-9)
        fmt = "preference"
    else:
        groups = []
    prompts, better, worse, margins = [], [], [], []
    for r in records:
        if kind == "cost":
            if fmt != "safety":
                raise DataError(
                    [RowProblem(source, 0, "<file>", "a cost model is evaluated on safety data")]
                )
            delta = r["chosen_safety"] - r["rejected_safety"]
            if delta == 0:
                continue
            safer, riskier = ("chosen", "rejected") if delta > 0 else ("rejected", "chosen")
            prompts.append(r["prompt"])
            better.append(r[safer])
            worse.append(r[riskier])
            margins.append(abs(delta))
        else:
            prompts.append(r["prompt"])
            better.append(r["chosen"])
            worse.append(r["rejected"])
            margins.append(r.get("margin", math.nan))
    has_margins = bool(margins) and not any(math.isnan(m) for m in margins)
    return EvalPairs(prompts, better, worse, margins if has_margins else None, groups)


def _scores(
    source: RewardEnsemble, prompts: Sequence[Any], responses: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """``(combined [N], members [K, N])`` with the sign that makes higher better."""
    combined, members = source.score_with_members(prompts, responses)
    sign = -1.0 if source.kind == "cost" else 1.0
    return sign * combined, sign * members


def _bucket_accuracy(diff: Tensor, margins: list[float]) -> dict[str, dict[str, float]]:
    m = torch.tensor(margins, dtype=torch.float64)
    edges = torch.quantile(m, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0], dtype=torch.float64))
    edges = torch.unique(edges)
    out = {}
    for i in range(len(edges) - 1):
        lo, hi = edges[i].item(), edges[i + 1].item()
        inside = (m >= lo) & ((m < hi) if i < len(edges) - 2 else (m <= hi))
        if inside.any():
            accuracy = pairwise_accuracy(diff[inside], torch.zeros(int(inside.sum())))
            out[f"[{lo:.3g}, {hi:.3g}]"] = {"accuracy": float(accuracy), "pairs": int(inside.sum())}
    return out


def _plot(path: Path, draw: Callable[[Any], None], title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 4.0), dpi=100)
    ax = fig.add_subplot()
    draw(ax)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def evaluate_reward_model(
    source: RewardEnsemble, pairs: EvalPairs, out_dir: Path | None = None, bins: int = 10
) -> dict[str, Any]:
    """All metrics of the module docstring as one JSON-ready dict; PNGs into ``out_dir``."""
    n = len(pairs.better)
    if n == 0:
        raise DataError([RowProblem("<data>", 0, "<file>", "no pairs with an order to evaluate")])
    both_prompts = list(pairs.prompts) * 2
    scores, members = _scores(source, both_prompts, pairs.better + pairs.worse)
    diff = scores[:n] - scores[n:]
    report: dict[str, Any] = {"model": source.name, "kind": source.kind, "pairs": n}
    report["accuracy"] = float(pairwise_accuracy(scores[:n], scores[n:]))
    if pairs.margins is not None:
        report["accuracy_by_margin"] = _bucket_accuracy(diff, pairs.margins)
    if pairs.groups:
        # every group's responses scored in one call, then cut per group
        flat_prompts = [p for p, responses, _ in pairs.groups for _ in responses]
        flat_responses = [r for _, responses, _ in pairs.groups for r in responses]
        predicted, _ = _scores(source, flat_prompts, flat_responses)
        taus, start = [], 0
        for _, responses, ratings in pairs.groups:
            group = predicted[start : start + len(responses)]
            start += len(responses)
            tau = kendall_tau(torch.tensor(ratings), group)
            if not math.isnan(tau):
                taus.append(tau)
        report["kendall_tau"] = {"mean": sum(taus) / len(taus) if taus else math.nan}
        report["kendall_tau"]["groups"] = len(taus)
    # Each pair in both orientations (p, outcome) and (1 - p, 1 - outcome): the data always
    # names the better response first, so one orientation alone would only ever see outcome 1.
    forward = torch.sigmoid(diff.double())
    observed = torch.ones(n, dtype=torch.float64)
    if pairs.margins is not None:
        observed = torch.where(torch.tensor(pairs.margins) == 0, 0.5, 1.0).double()
    probs, outcomes = torch.cat([forward, 1 - forward]), torch.cat([observed, 1 - observed])
    report["ece"] = expected_calibration_error(probs, outcomes, bins)
    robustness = {}
    for name, perturb in PERTURBATIONS.items():
        changed, _ = _scores(source, both_prompts, [perturb(t) for t in pairs.better + pairs.worse])
        robustness[name] = float(pairwise_accuracy(changed[:n], changed[n:]))
    # response order: the worse responses first, each pair's texts in other batches
    flipped, _ = _scores(source, both_prompts, pairs.worse + pairs.better)
    robustness["response_order"] = float(pairwise_accuracy(flipped[n:], flipped[:n]))
    report["robustness"] = robustness
    lengths = torch.tensor([len(t) for t in pairs.better + pairs.worse], dtype=torch.float64)
    both = torch.stack([scores.double(), lengths])
    report["length_correlation"] = (
        float(torch.corrcoef(both)[0, 1]) if lengths.std() > 0 else math.nan
    )
    report["margin"] = {"mean": float(diff.mean()), "std": float(diff.std(correction=0))}
    if len(source) > 1:
        member_diff = members[:, :n] - members[:, n:]
        report["members"] = {
            name: float(pairwise_accuracy(member_diff[k], torch.zeros(n)))
            for k, name in enumerate(source.names)
        }
        report["member_std"] = float(members.std(0, correction=0).mean())
        report["pair_uncertainty"] = {
            kind: float(pair_uncertainty(member_diff, kind).mean()) for kind in UNCERTAINTIES
        }
    if out_dir is not None:
        count, conf, hits = calibration_bins(probs, outcomes, bins)
        used = count > 0

        def reliability(ax: Any) -> None:
            ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
            ax.plot(conf[used].numpy(), hits[used].numpy(), marker="o", label="model")
            ax.set_xlabel("predicted P(better preferred)")
            ax.set_ylabel("observed frequency")
            ax.legend()

        def histogram(ax: Any) -> None:
            ax.hist(diff.numpy(), bins=30)
            ax.axvline(0.0, color="grey", linestyle="--")
            ax.set_xlabel("score(better) - score(worse)")
            ax.set_ylabel("pairs")

        _plot(out_dir / "reliability.png", reliability, f"ECE {report['ece']:.3f}")
        _plot(out_dir / "margins.png", histogram, "reward margin")
        report["plots"] = [str(out_dir / "reliability.png"), str(out_dir / "margins.png")]
    return report
