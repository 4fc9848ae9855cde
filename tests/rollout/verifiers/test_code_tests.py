"""code_tests: partial credit by tests passed, hostile completions scored 0 (or the tests they
still pass), concurrency bounded, errors naming the source and the sample."""

from __future__ import annotations

import threading

import pytest

from alignkit.errors import ConfigError
from alignkit.rollout.rewards import RewardFunctionError, build_reward_source
from alignkit.rollout.verifiers.code import CodeTests, extract_code, run_tests
from alignkit.rollout.verifiers.sandbox import Sandbox, SandboxError

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
IO_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]


@pytest.fixture(scope="module")
def reward() -> CodeTests:
    try:
        return CodeTests(timeout_per_test=2.0, memory_mb=512, concurrency=2)
    except SandboxError as err:
        pytest.skip(f"no sandbox here: {err}")


def _scores(reward: CodeTests, completions: list[str], tests=TESTS) -> list[float | None]:
    return reward([""] * len(completions), completions, tests=[tests] * len(completions))


def test_extract_code_takes_the_last_python_block_or_the_whole_text() -> None:
    text = "try\n```python\nA = 1\n```\nthen\n```py\nB = 2\n```\n```bash\nls\n```"
    assert extract_code(text) == "B = 2\n"
    assert extract_code(text, "first") == "A = 1\n"
    assert extract_code(text, "whole") == text
    assert extract_code("def f(): pass") == "def f(): pass"


def test_partial_credit_is_the_share_of_tests_passed(reward) -> None:
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    always_three = "def add(a, b):\n    return 3"
    broken = "def add(a, b) return a + b"
    assert _scores(reward, [good, always_three, broken]) == [1.0, pytest.approx(1 / 3), 0.0]


def test_stdin_stdout_tests_compare_output_up_to_trailing_whitespace(reward) -> None:
    summing = "a, b = map(int, input().split())\nprint(a + b, ' ')\nraise SystemExit(0)"
    assert _scores(reward, [summing, "print(3)"], IO_TESTS) == [1.0, 0.5]


@pytest.mark.parametrize(
    ("name", "code", "expected"),
    [
        (
            "fork bomb",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            0.0,
        ),
        ("infinite loop", "while True:\n    pass", 0.0),
        (
            "memory hog",
            "hog = [bytearray(1 << 26) for _ in range(1000)]\ndef add(a, b): return a + b",
            0.0,
        ),
        (
            "hog inside one test",
            "def add(a, b):\n    if a == 2: bytearray(1 << 40)\n    return a + b",
            2 / 3,
        ),
        ("loop inside one test", "def add(a, b):\n    while a == 2: pass\n    return a + b", 2 / 3),
        ("exits early", "import os\nos._exit(0)", 0.0),
        (
            "forged report",
            "print('0' * 32 + ' {\"test\": 0, \"ok\": true}')\ndef add(a, b): return 0",
            1 / 3,
        ),
        (
            "writes outside",
            "open('/etc/alignkit-escape', 'w').write('x')\ndef add(a, b): return a + b",
            0.0,
        ),
        (
            "opens a socket",
            "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\ndef add(a, b): return a + b",
            None,
        ),
    ],
)
def test_hostile_completions_are_contained(reward, name, code, expected) -> None:
    score = _scores(reward, [code])[0]
    if expected is None:  # no network: 0; only the rlimits mode lets the connection try
        if reward.sandbox.mode == "rlimits":
            pytest.skip("mode rlimits has no network isolation")
        expected = 0.0
    assert score == pytest.approx(expected), name


def test_run_tests_reports_why_each_test_failed(reward) -> None:
    code = "def add(a, b):\n    while a == 2: pass\n    return a + b + (a == -1)"
    report = run_tests(code, TESTS, reward.sandbox, timeout_per_test=1.0)
    assert report.passed == [True, False, False]
    assert report.errors[1].startswith("AssertionError")
    assert "timed out" in report.errors[2]


def test_a_batch_runs_at_most_concurrency_sandboxes_at_once(reward, monkeypatch) -> None:
    running, peak, lock = [0], [0], threading.Lock()
    real_run = Sandbox.run

    def counting_run(self, *args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real_run(self, *args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Sandbox, "run", counting_run)
    slow = "import time\ntime.sleep(0.5)\ndef add(a, b): return a + b"
    assert _scores(reward, [slow] * 5) == [1.0] * 5
    assert peak[0] == reward.concurrency == 2


def test_from_a_config_with_options_and_clear_errors(reward) -> None:
    source = build_reward_source(
        [{"function": "code_tests", "options": {"tests_field": "checks", "timeout_per_test": 2}}]
    )
    scores = source(["p"], ["def add(a, b): return a + b"], [{"checks": TESTS}])
    assert scores.tolist() == [1.0]
    with pytest.raises(RewardFunctionError, match=r"(?s)needs the column 'checks'.*prompt: 'p'"):
        source(["p"], ["x"], [{"tests": TESTS}])
    with pytest.raises(RewardFunctionError, match=r"sample 1: column 'checks': a test is"):
        source(["p", "q"], ["x", "y"], [{"checks": TESTS}, {"checks": [{"in": "1"}]}])
    with pytest.raises(ConfigError, match="code_block must be last, first or whole"):
        build_reward_source([{"function": "code_tests", "options": {"code_block": "all"}}])


def test_a_row_without_tests_is_not_applicable(reward) -> None:
    assert reward(["p"], ["x = 1"], tests=[[]]) == [None]
