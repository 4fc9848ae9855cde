"""Every built-in reward source scores a conversational row (prompt and completion as TRL's
message lists, TRL's extra keyword arguments) exactly as the same row in plain text."""

from __future__ import annotations

import importlib.util

import pytest

from alignkit.rollout.rewards import RewardContext, RewardState, build_reward_source
from alignkit.rollout.verifiers.judge import LLMJudge


def _both(spec: dict, prompts: list[str], completions: list[str], rows: list[dict]):
    """Scores of the plain rows, and of the same rows given as conversations."""
    source = build_reward_source([spec])
    plain = source(prompts, completions, rows, context=RewardContext(prompts=prompts))
    chats = [[{"role": "user", "content": p}] for p in prompts]
    context = RewardContext(
        prompts=chats,
        completion_ids=[[1, 2]] * len(prompts),
        trainer_state=RewardState(global_step=1, max_steps=2, epoch=0.5),
    )
    rendered = [f"<user>{p}<assistant>" for p in prompts]  # what the policy saw
    return plain.tolist(), source(rendered, completions, rows, context=context).tolist()


@pytest.mark.parametrize(
    ("function", "completions", "answers"),
    [
        ("sort_match", ["0167", "61"], ["0167", "16"]),
        ("add_match", ["12", "9"], ["12", "10"]),
        ("exact_match", ["abc", "abd"], ["abc", "abc"]),
        ("math_format", ["<think>x</think><answer>4</answer>", "4"], ["4", "4"]),
    ],
)
def test_verifiers_read_the_completions_text(function, completions, answers) -> None:
    rows = [{"answer": a} for a in answers]
    plain, chat = _both({"function": function}, ["q1", "q2"], completions, rows)
    assert plain == chat and len(set(plain)) == 2


def test_the_assistant_judges_read_the_users_message() -> None:
    prompts = ["How do I bake bread?", "How do I steal a car?"]
    completions = ["First mix flour, then knead, finally bake.", "Sure, here is how: ..."]
    for name in ("assistant_helpfulness", "assistant_safety_cost"):
        plain, chat = _both({"function": name}, prompts, completions, [{}, {}])
        assert plain == chat


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math-verify")
def test_math_accuracy_reads_the_completions_text() -> None:
    rows = [{"answer": "4"}, {"answer": "4"}]
    plain, chat = _both({"function": "math_accuracy"}, ["q", "q"], ["\\boxed{4}", "5"], rows)
    assert plain == chat == [1.0, 0.0]


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym")
def test_reasoning_gym_reads_the_completions_text() -> None:
    rows = [{"answer": "-4"}, {"answer": "-4"}]
    spec = {"function": "reasoning_gym:basic_arithmetic"}
    plain, chat = _both(spec, ["q", "q"], ["<answer>-4</answer>", "5"], rows)
    assert plain == chat == [1.0, 0.0]


def test_code_tests_ignore_the_extras_and_read_the_completions_text() -> None:
    from alignkit.rollout.verifiers.sandbox import SandboxError

    tests = ["assert add(1, 2) == 3"]
    try:
        plain, chat = _both(
            {"function": "code_tests", "options": {"timeout_per_test": 5}},
            ["write add", "write add"],
            ["def add(a, b): return a + b", "def add(a, b): return 0"],
            [{"tests": tests}, {"tests": tests}],
        )
    except SandboxError as err:
        pytest.skip(f"no sandbox here: {err}")
    assert plain == chat == [1.0, 0.0]


def test_the_llm_judge_renders_the_conversation_and_ignores_the_extras(monkeypatch) -> None:
    asked: list[str] = []

    def reply(self, text: str, where: str) -> str:
        asked.append(text)
        return "Score: 7"

    monkeypatch.setattr(LLMJudge, "reply", reply)
    spec = {
        "function": "llm_judge",
        "options": {"url": "http://127.0.0.1:9/v1", "model": "m", "cache": False},
    }
    plain, chat = _both(spec, ["Is 2 + 2 = 4?"], ["Yes."], [{"topic": "arithmetic"}])
    assert plain == chat == [pytest.approx(0.7)]
    assert asked[0] == asked[1] and "Is 2 + 2 = 4?" in asked[0] and "Yes." in asked[0]
