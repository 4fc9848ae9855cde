"""How much each annotator's label counts, from evidence of their accuracy (pure; no database).

Model (one-coin Dawid-Skene with a Beta prior; A. P. Dawid and A. M. Skene, "Maximum likelihood
estimation of observer error-rates using the EM algorithm", Applied Statistics 28, 1979). Each
annotator ``j`` names the truly better response of a pair with probability ``p_j`` whenever they
do not answer "tie" (a tie is no vote and no evidence). With a ``Beta(alpha, beta)`` prior,
``p_j`` is estimated from two kinds of evidence:

    p_j = (alpha + gold_right_j + sum_k P(label k right | the task's labels))
          / (alpha + beta + gold_answered_j + n_j)

- gold: the annotator's non-tie answers to gold pairs, right or wrong;
- agreement: each non-tie label ``k`` of ``j`` on a task where someone else with weight voted
  too (``n_j`` such labels), counted as right with the posterior probability that the task's
  labels, weighed by the current estimates, give its answer (the E step of Dawid-Skene; a label
  alone on its task would only confirm itself, so it is no evidence).

The posteriors use the current estimates, so the two steps alternate (EM, a MAP estimate under
the prior) until the estimates stop moving; confidence plays no part in them (it is the
annotator's own claim, not evidence). The vote of a label (annotator ``j``, confidence ``c`` in
1..5) is

    w_j = max(0, log(p_j / (1 - p_j)))                    # the log-odds that j is right
    vote = w_j * (floor + (1 - floor) * (c - 1) / 4)        # floor = 0.8: confidence 1 counts 80 %

and a task's log-odds that response a is better is ``L = sum vote * v`` (``v = +1`` for a, -1 for
b, 0 for a tie): its posterior is ``P(a better) = sigmoid(L)``. Hence:

- weight rests on evidence of accuracy: an annotator at chance (``p = 1/2``) has weight 0,
  however confident or fast; confidence only discounts a vote, by at most 20 %, and never raises
  it above the annotator's accuracy weight;
- an annotator *below chance on gold* (posterior probability >= ``below_chance`` that their
  gold accuracy is under 1/2, with a uniform prior: 0 right of 3, 1 of 6, 2 of 9 ...) gets
  weight 0 whatever their agreement;
- an annotator who answers gold right and real pairs wrong (who could tell gold apart) loses
  their weight through agreement: the others disagree with them;
- an annotator with no evidence keeps the prior's weight, ``logit(alpha / (alpha + beta))``
  (0.41 with the default ``Beta(3, 2)``: presumed a little better than chance); the export
  reports rows that rest on such annotators alone.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from alignkit.annotate.limits import check_number

__all__ = ["AnnotatorEstimate", "Label", "QualityConfig", "below_chance", "estimate", "vote_scale"]

_VOTE = {"a": 1.0, "b": -1.0, "tie": 0.0}


@dataclass(frozen=True)
class QualityConfig:
    prior_right: float = 3.0  # Beta prior of an annotator's accuracy, in labels' worth
    prior_wrong: float = 2.0
    below_chance: float = 0.9  # P(gold accuracy < 1/2) from which an annotator gets no weight
    confidence_floor: float = 0.8  # a confidence-1 vote counts this much of a confidence-5 one
    min_gold: int = 5  # gold answers under which the export warns about an annotator
    iterations: int = 200
    tolerance: float = 1e-9

    def __post_init__(self) -> None:
        check_number("prior_right", self.prior_right, 0, low_open=True)
        check_number("prior_wrong", self.prior_wrong, 0, low_open=True)
        check_number("below_chance", self.below_chance, 0.5, 1, low_open=True)
        check_number("confidence_floor", self.confidence_floor, 0, 1)
        check_number("min_gold", self.min_gold, 0, integer=True)
        check_number("iterations", self.iterations, 1, integer=True)
        check_number("tolerance", self.tolerance, 0, low_open=True)


@dataclass(frozen=True)
class Label:
    annotator: Hashable
    task: Hashable
    choice: str  # a | b | tie
    confidence: int  # 1..5


@dataclass(frozen=True)
class AnnotatorEstimate:
    accuracy: float  # p_j, the posterior mean
    weight: float  # w_j
    gold_right: int
    gold_answered: int  # non-tie gold answers
    agreement_labels: int  # n_j: labels scored against others
    below_chance_on_gold: bool

    @property
    def evidence(self) -> int:
        """Labels the estimate rests on beyond the prior."""
        return self.gold_answered + self.agreement_labels


def vote_scale(confidence: int, config: QualityConfig) -> float:
    """The confidence factor of a vote: ``floor`` at 1 up to 1 at 5."""
    return config.confidence_floor + (1 - config.confidence_floor) * (confidence - 1) / 4


def below_chance(right: int, answered: int, threshold: float) -> bool:
    """``P(accuracy < 1/2 | right of answered) >= threshold`` under a uniform prior: the
    posterior is ``Beta(1 + right, 1 + wrong)``, and ``I_{1/2}(a, b) = P(Binomial(a + b - 1,
    1/2) >= a)``."""
    if answered == 0:
        return False
    trials = answered + 1
    tail = sum(math.comb(trials, k) for k in range(right + 1, trials + 1))
    return tail / 2**trials >= threshold


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def estimate(
    labels: Sequence[Label],
    gold: Mapping[Hashable, tuple[int, int]],
    config: QualityConfig | None = None,
) -> dict[Hashable, AnnotatorEstimate]:
    """Every annotator's accuracy and weight (module docstring) from their labels on non-gold
    tasks and their gold record ``{annotator: (right, answered)}`` (non-tie answers)."""
    config = config or QualityConfig()
    names = sorted({x.annotator for x in labels} | set(gold), key=repr)
    index = {n: i for i, n in enumerate(names)}
    tasks = {t: i for i, t in enumerate(dict.fromkeys(x.task for x in labels))}
    who = np.array([index[x.annotator] for x in labels], dtype=np.int64)
    task = np.array([tasks[x.task] for x in labels], dtype=np.int64)
    vote = np.array([_VOTE[x.choice] for x in labels], dtype=np.float64)
    right = np.array([gold.get(n, (0, 0))[0] for n in names], dtype=np.float64)
    answered = np.array([gold.get(n, (0, 0))[1] for n in names], dtype=np.float64)
    barred = np.array(
        [below_chance(*gold.get(n, (0, 0)), config.below_chance) for n in names], dtype=bool
    )
    alpha, beta = config.prior_right, config.prior_wrong
    p = (alpha + right) / (alpha + beta + answered)
    used = np.zeros(len(names))
    for _ in range(config.iterations):
        weight = np.where(barred, 0.0, np.maximum(_logit(p), 0.0))
        own = weight[who] * vote
        log_odds = np.bincount(task, own, len(tasks))[task]
        others_weight = np.bincount(task, np.abs(own), len(tasks))[task] - np.abs(own)
        scored = (vote != 0) & (others_weight > 0)
        p_right = 1.0 / (1.0 + np.exp(-vote * log_odds))  # P(label right | the task's labels)
        agree = np.bincount(who[scored], p_right[scored], len(names))
        used = np.bincount(who[scored], minlength=len(names)).astype(np.float64)
        new = (alpha + right + agree) / (alpha + beta + answered + used)
        done = np.max(np.abs(new - p), initial=0.0) < config.tolerance
        p = new
        if done:
            break
    weight = np.where(barred, 0.0, np.maximum(_logit(p), 0.0))
    return {
        n: AnnotatorEstimate(
            accuracy=float(p[i]),
            weight=float(weight[i]),
            gold_right=int(right[i]),
            gold_answered=int(answered[i]),
            agreement_labels=int(used[i]),
            below_chance_on_gold=bool(barred[i]),
        )
        for n, i in index.items()
    }
