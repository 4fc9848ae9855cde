"""Checks across a pipeline's stages, shown in its summary table.

Reward hacking: an online stage raises the score of the reward it is trained on (its
``reward/mean``, first iteration -> last) while an independent judge, scoring the stage's input
model and then its output model in ``eval-policy`` stages, says the policy got worse. The
classic pipeline shows it: PPO raises the trained reward model's score 6.59 -> 8.09 while the
task's judge rates held-out answers 0.268 -> 0.248 and their cost rises. A judge is a reward
source of both evaluations that the stage did not train on (the bundled task's ``synthetic``
judges; a model directory reports under its ensemble's name and cannot be told apart from the
trained model, so it is not used); its ``<source>/reward/mean`` falling, or
``<source>/cost/mean`` rising, while the trained reward rises, is flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Disagreement", "judge_disagreements"]

#: Judge metrics of an ``eval-policy`` stage and the direction that means "better".
JUDGE_SUFFIXES = {"/reward/mean": 1.0, "/cost/mean": -1.0}


@dataclass(frozen=True)
class Disagreement:
    """The trained reward rose while a judge's metric got worse over one online stage."""

    stage: str
    trained_before: float
    trained_after: float
    judge_metric: str
    judge_before: float
    judge_after: float
    before_stage: str  # the eval-policy stage of the input model
    after_stage: str  # ... and of the output model

    def text(self) -> str:
        return (
            f"possible reward hacking: the trained reward rose {self.trained_before:.3f} -> "
            f"{self.trained_after:.3f} while the judge's {self.judge_metric} went "
            f"{self.judge_before:.3f} -> {self.judge_after:.3f} "
            f"({self.before_stage} -> {self.after_stage})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "text": self.text()}


def judge_disagreements(records: Sequence[Any]) -> list[Disagreement]:
    """Every (online stage, judge metric) pair where the two disagree (module docstring).

    ``records`` are the pipeline's `StageRecord` s: an online stage's artifacts name its
    ``input_model``, output ``model`` and ``reward_sources``; an eval-policy stage's name the
    ``model`` it evaluated and its ``rewards``.
    """
    evals: dict[str, Any] = {}
    for r in records:
        if r.kind == "eval-policy" and r.artifacts.get("model") is not None:
            evals.setdefault(str(r.artifacts["model"]), r)  # the first evaluation of a model
    found = []
    for stage in records:
        trained = stage.artifacts.get("reward_sources")
        if stage.metric != "reward/mean" or trained is None or stage.before is None:
            continue
        if not stage.after > stage.before:
            continue
        before = evals.get(str(stage.artifacts.get("input_model")))
        after = evals.get(str(stage.artifacts.get("model")))
        if before is None or after is None:
            continue
        judges = _judges(before, trained) & _judges(after, trained)
        for key in sorted(before.artifacts.get("metrics", {})):
            suffix = next((s for s in JUDGE_SUFFIXES if key.endswith(s)), None)
            if suffix is None or key.removesuffix(suffix) not in judges:
                continue
            old, new = before.artifacts["metrics"][key], after.artifacts["metrics"].get(key)
            if new is not None and JUDGE_SUFFIXES[suffix] * (new - old) < 0:
                found.append(
                    Disagreement(
                        stage.name,
                        stage.before,
                        stage.after,
                        key,
                        old,
                        new,
                        before.name,
                        after.name,
                    )
                )
    return found


def _judges(evaluation: Any, trained: Sequence[str]) -> set[str]:
    """The evaluation's sources that report under the name they were given (``synthetic``)
    and that the stage did not train on. A model directory reports under its ensemble's name,
    which does not say which model it was, so it is never taken for a judge."""
    sources = evaluation.artifacts.get("rewards") or ["synthetic"]
    names = {str(s) for s in sources if not Path(str(s)).exists()}
    return names - {str(t) for t in trained}
