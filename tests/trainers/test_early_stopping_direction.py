"""Early stopping infers which way is better from the metric's name unless told."""

from __future__ import annotations

import pytest

from alignkit.config import EarlyStoppingConfig
from alignkit.runloop.runtime import LoopState


@pytest.mark.parametrize(
    ("metric", "direction"),
    [
        ("eval/loss", "min"),
        ("eval/nll_loss", "min"),
        ("eval/cost", "min"),
        ("eval/rewards/accuracies", "max"),
        ("eval/accuracy", "max"),
        ("eval/sign_accuracy", "max"),
        ("eval/rewards/margins", "max"),
        ("eval/win_rate", "max"),
    ],
)
def test_auto_direction_from_the_metric_name(metric, direction):
    assert EarlyStoppingConfig(metric=metric).direction == direction
    flipped = "min" if direction == "max" else "max"
    assert EarlyStoppingConfig(metric=metric, mode=flipped).direction == flipped


def test_rising_accuracy_is_an_improvement_by_default():
    rule = EarlyStoppingConfig(metric="eval/accuracy", patience=1)
    state = LoopState()
    for step, accuracy in enumerate([0.5, 0.7, 0.9], start=1):
        state.step = step
        assert state.observe_evaluation(rule, {"eval/accuracy": accuracy}) is False
    assert (state.best_metric, state.best_step) == (0.9, 3)
    state.step = 4
    assert state.observe_evaluation(rule, {"eval/accuracy": 0.8}) is True  # patience 1
