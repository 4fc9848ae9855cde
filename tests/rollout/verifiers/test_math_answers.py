"""math_accuracy / math_format: math-verify's equivalences, where the answer is read, the
row's answer column, and errors."""

from __future__ import annotations

import threading

import pytest

from alignkit.errors import ConfigError
from alignkit.rollout.rewards import RewardFunctionError, build_reward_source
from alignkit.rollout.verifiers.math_answers import (
    MathAccuracy,
    MathFormat,
    final_answer,
    math_score,
)


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is 42.", "42", 1.0),
        ("6 * 7 = 42", 42, 1.0),
        (r"So $\boxed{\frac{1}{3}}$.", r"\frac{1}{3}", 1.0),
        (r"\boxed{\dfrac{1}{3}}", "1/3", 1.0),
        (r"\boxed{0.5}", r"\frac12", 1.0),
        (r"\boxed{1+x}", "x+1", 1.0),
        ("0.3333", r"\frac{1}{3}", 0.0),
        ("I do not know", "42", 0.0),
        ("<think>maybe 41</think> It is 42", "42", 1.0),
        ("It is 42", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 0.0),
        ("It is 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
        ("It is 72", "no number here", None),
    ],
)
def test_any_format_reads_the_final_answer_like_trl(completion, answer, expected) -> None:
    assert math_score(completion, answer, "any") == expected


@pytest.mark.parametrize(
    ("completion", "format", "found"),
    [
        ("<think>a</think>\n<answer>7</answer>\n", "think_answer", "7"),
        ("<think>a</think><answer>7</answer> trailing", "think_answer", None),
        ("<think>a<think>b</think><answer>7</answer>", "think_answer", None),
        ("<answer>7</answer>", "think_answer", None),
        ("x <answer>6</answer> y <answer>7</answer>", "answer_tags", "7"),
        ("no tags", "answer_tags", None),
        (r"\boxed{1} then \boxed{\frac{2}{3}}", "boxed", r"\frac{2}{3}"),
        (r"\boxed{\frac{2}{3}", "boxed", None),
    ],
)
def test_formats_locate_the_answer(completion, format, found) -> None:
    assert final_answer(completion, format) == found


def test_a_required_format_that_is_missing_scores_zero() -> None:
    assert math_score("the answer is 7", "7", "answer_tags") == 0.0
    assert math_score("<think>x</think><answer>\\frac{14}{2}</answer>", "7", "think_answer") == 1.0


def test_the_sources_from_a_config_with_weights_and_options() -> None:
    source = build_reward_source(
        [
            {"function": "math_accuracy", "options": {"format": "think_answer"}},
            {"function": "math_format", "weight": 0.25},
        ]
    )
    completions = ["<think>2+2</think><answer>4</answer>", "<answer>4</answer>", "4"]
    rows = [{"solution": "4"}] * 3
    assert source(["p"] * 3, completions, rows).tolist() == [1.25, 0.0, 0.0]
    assert source.last_components["math_format"].tolist() == [1.0, 0.0, 0.0]


def test_the_answer_column_is_named_or_found() -> None:
    reward = MathAccuracy(answer_field="gold")
    assert reward(["p"], ["3"], gold=["3"], answer=["4"]) == [1.0]
    with pytest.raises(KeyError, match="'answer' or 'solution'"):
        MathAccuracy()(["p"], ["3"], answer=["3"], solution=["3"])
    source = build_reward_source([{"function": "math_accuracy"}])
    with pytest.raises(RewardFunctionError, match=r"(?s)math_accuracy.*rows have: label"):
        source(["p"], ["3"], [{"label": "3"}])


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"format must be one of boxed"):
        build_reward_source([{"function": "math_format", "options": {"format": "any"}}])
    with pytest.raises(ConfigError, match="accepted: format, answer_field"):
        build_reward_source([{"function": "math_accuracy", "options": {"fromat": "boxed"}}])
    assert MathFormat(format="boxed")(["p", "q"], [r"\boxed{1}", "1"]) == [1.0, 0.0]


def test_off_the_main_thread_it_still_scores() -> None:
    # math-verify's SIGALRM limit exists only on the main thread: elsewhere it runs without it.
    out = []
    thread = threading.Thread(target=lambda: out.append(math_score(r"\boxed{2}", "2")))
    thread.start()
    thread.join()
    assert out == [1.0]
