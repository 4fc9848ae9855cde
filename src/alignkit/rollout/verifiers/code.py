"""``code_tests``: the completion's Python code run against the row's tests in a sandbox.

Score = share of the row's tests passed, in [0, 1]; None (not applicable) for a row with an
empty test list. A test is

- a string: Python run after the solution, in a copy of the solution's namespace (the solution
  is run once, as a module named ``solution``); it passes when it raises nothing (``assert
  add(1, 2) == 3``);
- ``{"input": str, "output": str}``: the solution run as ``__main__`` with that stdin; it passes
  when it ends normally (``sys.exit(0)`` included) and its stdout equals ``output`` up to
  trailing whitespace on each line and trailing empty lines.

All tests of one completion run in one sandboxed process (``verifiers.sandbox``), each with its
own time limit (SIGALRM); the process has ``timeout_per_test * len(tests) + 2`` seconds of wall
clock and CPU. A test that is not reported (the process was killed, or the code ended it) fails.
The completions of a batch run concurrently, at most ``concurrency`` at a time.

What the sandbox does not do: it contains the code, it does not make reward hacking impossible.
The tests (not the expected outputs of ``input``/``output`` tests, which stay in the parent) are
in the harness's memory, so code that inspects its interpreter can read them, or forge a report
(each report carries a random nonce, so printing a fake one is not enough).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.rollout.registry import completion_text, register_reward, row_columns
from alignkit.rollout.verifiers.sandbox import Sandbox, SandboxLimits

__all__ = ["CodeTests", "TestReport", "extract_code", "run_tests"]

_HARNESS = (Path(__file__).parent / "code_harness.py").read_text(encoding="utf-8")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3"}
_MAX_OUTPUT = 1 << 18


def extract_code(completion: str, block: str = "last") -> str:
    """The code of a completion: the ``last`` (or ``first``) fenced block tagged python (or
    untagged), else the whole completion; ``whole``: the completion as it is."""
    if block == "whole":
        return completion
    blocks = [m.group(2) for m in _FENCE.finditer(completion) if m.group(1).lower() in _PYTHON_TAGS]
    if not blocks:
        return completion
    return blocks[-1] if block == "last" else blocks[0]


@dataclass(frozen=True)
class TestReport:
    """One completion's run: per-test pass/fail and error text, and how the process ended."""

    passed: list[bool]
    errors: list[str]
    timed_out: bool
    returncode: int

    @property
    def score(self) -> float:
        return sum(self.passed) / len(self.passed)


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _check_tests(tests: Any) -> list[str | Mapping[str, Any]]:
    if not isinstance(tests, (list, tuple)):
        raise ValueError(f"tests must be a list, got {type(tests).__name__}")
    for test in tests:
        if isinstance(test, str):
            continue
        if not (isinstance(test, Mapping) and set(test) == {"input", "output"}):
            raise ValueError(f"a test is a string or {{input, output}}, got {test!r:.80}")
        if not all(isinstance(v, str) for v in test.values()):
            raise ValueError(f"a test's input and output are strings, got {test!r:.80}")
    return list(tests)


def run_tests(
    code: str,
    tests: Sequence[str | Mapping[str, Any]],
    sandbox: Sandbox,
    *,
    timeout_per_test: float = 5.0,
    memory_mb: int = 1024,
) -> TestReport:
    """Run ``code`` against ``tests`` (see the module docstring) in one sandboxed process."""
    tests = _check_tests(tests)
    nonce = secrets.token_hex(16)
    job = {
        "nonce": nonce,
        "code": code,
        "timeout": timeout_per_test,
        "max_output": _MAX_OUTPUT,
        "tests": [
            {"kind": "assert", "code": t}
            if isinstance(t, str)
            else {"kind": "io", "input": t["input"]}
            for t in tests
        ],
    }
    budget = timeout_per_test * len(tests) + 2
    output_bytes = (_MAX_OUTPUT + 4096) * 2 * len(tests)  # JSON may double the text
    limits = SandboxLimits(
        cpu_seconds=math.ceil(budget),
        wall_seconds=budget,
        memory_mb=memory_mb,
        file_size_mb=max(16, (output_bytes >> 20) + 1),
        output_bytes=output_bytes,
    )
    result = sandbox.run_python(
        "harness.py",
        files={"harness.py": _HARNESS},
        stdin=json.dumps(job).encode(),
        limits=limits,
    )
    passed = [True] * len(tests)
    reported = [False] * len(tests)
    errors = [""] * len(tests)
    for line in result.stdout.decode("utf-8", errors="replace").splitlines():
        head, _, body = line.partition(" ")
        if head != nonce:
            continue
        try:
            entry = json.loads(body)
            index, ok = int(entry["test"]), entry["ok"] is True
        except (ValueError, KeyError, TypeError):
            continue
        if not 0 <= index < len(tests):
            continue
        expected = tests[index]
        if ok and isinstance(expected, Mapping):
            ok = _normalise(str(entry.get("output", ""))) == _normalise(expected["output"])
            errors[index] = errors[index] or ("" if ok else "wrong output")
        # A forked copy of the harness may report a test twice: it passes only if all agree.
        passed[index] = passed[index] and ok
        reported[index] = True
        errors[index] = errors[index] or str(entry.get("error", ""))[:300]
    for i, seen in enumerate(reported):
        if not seen:
            passed[i] = False
            errors[i] = "timed out" if result.timed_out else "not run (the process ended)"
    return TestReport(passed, errors, result.timed_out, result.returncode)


@register_reward("code_tests")
class CodeTests:
    """Reward: share of the row's tests the completion's code passes (see the module docstring).

    Options: ``tests_field`` (the column holding the tests), ``code_block`` (``last``, ``first``
    fenced python block, or ``whole`` completion), ``timeout_per_test`` (seconds), ``memory_mb``
    (address-space limit), ``sandbox`` (``auto``, ``bwrap``, ``unshare``, ``rlimits``),
    ``concurrency`` (completions run at once; default: the CPU count, at most 8), ``python``
    (the interpreter inside the sandbox; default this one).
    """

    def __init__(
        self,
        *,
        tests_field: str = "tests",
        code_block: str = "last",
        timeout_per_test: float = 5.0,
        memory_mb: int = 1024,
        sandbox: str = "auto",
        concurrency: int | None = None,
        python: str | None = None,
    ) -> None:
        if code_block not in ("last", "first", "whole"):
            raise ValueError(f"code_block must be last, first or whole, got {code_block!r}")
        if not timeout_per_test > 0 or memory_mb < 64:
            raise ValueError("timeout_per_test must be > 0 and memory_mb >= 64")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency or max(1, min(8, os.cpu_count() or 1))
        self.tests_field = tests_field
        self.code_block = code_block
        self.timeout_per_test = timeout_per_test
        self.memory_mb = memory_mb
        self.sandbox = Sandbox(sandbox, python=python)

    def __call__(
        self, prompts: list[str], completions: list[str], **fields: Any
    ) -> list[float | None]:
        fields = row_columns(fields)
        if self.tests_field not in fields:
            raise KeyError(
                f"code_tests needs the column '{self.tests_field}' (options.tests_field); the "
                f"rows have: {', '.join(sorted(fields)) or 'no other column'}"
            )
        tests = fields[self.tests_field]
        for i, row_tests in enumerate(tests):
            try:
                _check_tests(row_tests)
            except ValueError as err:
                raise ValueError(f"sample {i}: column '{self.tests_field}': {err}") from None

        def score(i: int) -> float | None:
            if not tests[i]:
                return None
            code = extract_code(completion_text(completions[i]), self.code_block)
            report = run_tests(
                code,
                tests[i],
                self.sandbox,
                timeout_per_test=self.timeout_per_test,
                memory_mb=self.memory_mb,
            )
            return report.score

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(score, range(len(completions))))
