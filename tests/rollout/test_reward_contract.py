"""TRL 1.16's reward-function contract: message lists for conversational rows, TRL's extra
keyword arguments, functions called with what they name, callables, the nansum rule for None,
NaN treated as None, async functions."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from alignkit.rollout.registry import RewardFunctionError
from alignkit.rollout.reward_functions import RewardLog, sample_keys
from alignkit.rollout.rewards import (
    FunctionReward,
    RewardContext,
    RewardState,
    WeightedReward,
    build_reward_source,
    resolve_reward_function,
)
from alignkit.trainers.rl_config import RewardSourceConfig

CHAT = [{"role": "user", "content": "What is 2 + 2?"}]
RENDERED = ["<|user|>What is 2 + 2?<|assistant|>", "<|user|>What is 2 + 2?<|assistant|>", "3 + 4 ="]
COMPLETIONS = ["4", "five", "7"]
ROWS = [{"answer": "4"}, {"answer": "4"}, {"answer": "7"}]
CONTEXT = RewardContext(
    prompts=[CHAT, CHAT, "3 + 4 ="],
    completion_ids=[[7, 2], [9, 9, 2], [5]],
    trainer_state=RewardState(global_step=3, max_steps=10, epoch=0.5),
)


def trl_accuracy(prompts, completions, answer, **kwargs):
    """The TRL documentation's idiom for conversational data."""
    return [float(c[0]["content"] == a) for c, a in zip(completions, answer, strict=True)]


def test_conversational_rows_give_message_lists_and_plain_rows_strings() -> None:
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [1.0, 1.0, 1.0]

    FunctionReward(spy)(RENDERED, COMPLETIONS, ROWS, context=CONTEXT)
    assert seen["prompts"] == [CHAT, CHAT, "3 + 4 ="]  # as the data gave them, not rendered
    assert seen["completions"] == [
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "five"}],
        "7",
    ]
    assert seen["completion_ids"] == [[7, 2], [9, 9, 2], [5]]
    assert seen["trainer_state"].global_step == 3 and seen["trainer_state"].max_steps == 10
    assert callable(seen["log_extra"]) and callable(seen["log_metric"])
    assert seen["answer"] == ["4", "4", "7"]


def test_the_trl_idiom_scores_conversational_rows() -> None:
    context = RewardContext(prompts=[CHAT, CHAT, CHAT])
    scores = FunctionReward(trl_accuracy)(RENDERED, COMPLETIONS, ROWS, context=context)
    assert scores.tolist() == [1.0, 0.0, 1.0]
    # without the context (texts only) the idiom fails, naming the function and a sample
    with pytest.raises(RewardFunctionError, match="'trl_accuracy' raised TypeError"):
        FunctionReward(trl_accuracy)(RENDERED, COMPLETIONS, ROWS)


def test_a_function_without_kwargs_gets_only_what_it_names() -> None:
    def named(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    assert FunctionReward(named)(RENDERED, COMPLETIONS, ROWS).tolist() == [1.0, 0.0, 1.0]

    def needs_a_column(completions, solution):
        return [0.0] * len(completions)

    message = r"takes 'solution', which is neither a column of the prompt rows \(answer\)"
    with pytest.raises(RewardFunctionError, match=message):
        FunctionReward(needs_a_column)(RENDERED, COMPLETIONS, ROWS)

    def with_default(completions, solution=None, trainer_state=None):
        return [float(trainer_state.global_step)] * len(completions)

    scores = FunctionReward(with_default)(RENDERED, COMPLETIONS, ROWS, context=CONTEXT)
    assert scores.tolist() == [3.0, 3.0, 3.0]


def test_several_functions_sum_over_those_that_scored_a_sample() -> None:
    # TRL's multi-task pattern: each function scores half of the rows, None on the others.
    def first_half(prompts, completions, **_):
        return [1.0, None, None]

    def second_half(prompts, completions, **_):
        return [None, 0.5, None]

    weighted = WeightedReward(
        [(FunctionReward(first_half), 1.0), (FunctionReward(second_half), 2.0)]
    )
    scores = weighted(RENDERED, COMPLETIONS, ROWS)
    assert scores[:2].tolist() == [1.0, 1.0]  # 1 * 1.0 ; 2 * 0.5
    assert math.isnan(scores[2])  # no function scored it: unscored
    assert list(weighted.last_components) == ["first_half", "second_half"]
    assert torch.isnan(weighted.last_components["first_half"][1:]).all()


def test_nan_is_none_and_said_once(caplog) -> None:
    def nan_for_no(prompts, completions, **_):
        return [1.0, float("nan"), 0.0]

    source = FunctionReward(nan_for_no)
    with caplog.at_level(logging.WARNING, logger="alignkit.rewards"):
        first = source(RENDERED, COMPLETIONS, ROWS)
        source(RENDERED, COMPLETIONS, ROWS)
    assert math.isnan(first[1]) and first[[0, 2]].tolist() == [1.0, 0.0]
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "NaN for 1 of 3 samples: treated as None" in notes[0]


def test_a_callable_is_a_reward_wherever_a_function_is_taken() -> None:
    source = build_reward_source([trl_accuracy, {"function": trl_accuracy, "weight": 2.0}])
    context = RewardContext(prompts=[CHAT, CHAT, CHAT])
    assert source(RENDERED, COMPLETIONS, ROWS, context=context).tolist() == [3.0, 0.0, 3.0]
    assert source.names == ["trl_accuracy", "trl_accuracy_2"]
    config = RewardSourceConfig(function=trl_accuracy, weight=0.5)
    from_config = build_reward_source([config.spec()])
    assert from_config(RENDERED, COMPLETIONS, ROWS, context=context).tolist() == [0.5, 0.0, 0.5]
    assert resolve_reward_function(trl_accuracy) is trl_accuracy


def test_a_coroutine_function_is_awaited() -> None:
    async def slow(prompts, completions, **_):
        return [len(c) for c in completions]

    assert FunctionReward(slow)(RENDERED, COMPLETIONS, ROWS).tolist() == [1.0, 4.0, 1.0]


def test_logged_columns_follow_their_samples_and_metrics_average() -> None:
    log = RewardLog()
    log_extra, log_metric = log.hooks(5, [10, 10, 11])
    log_extra("parsed", ["4", "five", None])
    log_metric("format_ok", 1.0)
    log_metric("format_ok", 0.5)
    # a later selection of the rows (dynamic sampling) finds each row's value by its key
    assert log.columns(5, [11, 10]) == [{"parsed": None}, {"parsed": "4"}]
    assert log.columns(5, [10, 10, 11]) == [{"parsed": "4"}, {"parsed": "five"}, {"parsed": None}]
    assert log.metric_means(5) == {"format_ok": 0.75} and log.metric_means(5) == {}
    assert log.columns(6, [10]) == [{}]  # another iteration starts afresh
    with pytest.raises(ValueError, match="2 values, 3 samples"):
        log.hooks(6, [1, 1, 2])[0]("x", [1, 2])
    assert sample_keys([3, 3, 4, 3]) == [(3, 0), (3, 1), (4, 0), (3, 2)]
