"""Tools: schemas from signatures and docstrings, calls with limits, errors back to the model
(never a crash), tool-call formats, the calculator."""

from __future__ import annotations

import time

import pytest
from env_helpers import chat_tokenizer

from alignkit.models.tiny import load_tiny_tokenizer
from alignkit.rollout.environments import calculator
from alignkit.rollout.tool_calls import detect_tool_format, get_tool_format, renders_tools
from alignkit.rollout.tools import ToolBox, ToolCall, ToolDefinitionError, tool_schema


def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


def sleeper(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long.
    """
    time.sleep(seconds)
    return "slept"


def spinner(n: int) -> int:
    """Loop forever.

    Args:
        n: ignored.
    """
    while True:
        n += 1


def failing(x: str) -> str:
    """Raise.

    Args:
        x: anything.
    """
    raise KeyError(x)


class Counter:
    """Per-episode state behind a tool: a bound method."""

    def __init__(self) -> None:
        self.count = 0

    def bump(self, by: int) -> dict:
        """Increase the counter.

        Args:
            by: the increment.
        """
        self.count += by
        return {"count": self.count}


def test_schema_comes_from_the_signature_and_docstring():
    schema = tool_schema(add)
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "add" and function["description"] == "Add two integers."
    assert function["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "the first.",
    }
    assert function["parameters"]["required"] == ["a"]
    assert tool_schema(Counter().bump)["function"]["parameters"]["required"] == ["by"]


def test_a_tool_without_argument_docs_is_a_clear_error():
    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ToolDefinitionError, match=r"tool 'test_a_tool.*undocumented'.*Args"):
        tool_schema(undocumented)
    with pytest.raises(ToolDefinitionError, match="two tools are named 'add'"):
        ToolBox([add, add])


def test_calls_and_every_failure_come_back_as_messages():
    box = ToolBox([add, failing, Counter().bump], timeout=5)
    assert box.call(ToolCall("add", {"a": 2, "b": 3})).content == "5"
    result = box.call(ToolCall("bump", {"by": 2}))
    assert (result.content, result.error) == ('{"count": 2}', False)
    assert box.call(ToolCall("bump", {"by": 3})).content == '{"count": 5}'  # the same instance
    cases = [
        (ToolCall("nope", {}), "error: there is no tool named 'nope' (tools: add, failing, bump)"),
        (
            ToolCall("add", {"b": 1}),
            "error: bad arguments {\"b\": 1}: missing a required argument: 'a'",
        ),
        (ToolCall("add", {"a": 1, "c": 2}), "unexpected keyword argument 'c'"),
        (ToolCall("failing", {"x": "k"}), "error: KeyError: 'k'"),
    ]
    for call, expected in cases:
        result = box.call(call)
        assert result.error and expected in result.content


def test_long_outputs_are_cut():
    box = ToolBox([add], max_output_chars=3)
    assert box.call(ToolCall("add", {"a": 123456})).content == "123... [cut at 3 characters]"


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_call_that_outlives_its_timeout_is_an_error_not_a_hang(isolation):
    box = ToolBox([sleeper, spinner], timeout=0.3, isolation=isolation)
    started = time.perf_counter()
    # A process is killed, so it may spin forever; a thread is abandoned, so it only sleeps.
    runaway = (
        ToolCall("spinner", {"n": 0})
        if isolation == "process"
        else ToolCall("sleeper", {"seconds": 30})
    )
    result = box.call(runaway)
    assert time.perf_counter() - started < 5
    assert result.error and result.content == "error: the call timed out after 0.3 s"
    assert box.call(ToolCall("sleeper", {"seconds": 0})).content == "slept"


def test_a_process_tool_that_dies_is_an_error():
    import os

    def dies(code: int) -> str:
        """Exit at once.

        Args:
            code: the exit code.
        """
        os._exit(code)

    result = ToolBox([dies], isolation="process").call(ToolCall("dies", {"code": 3}))
    assert result.error and "ended without a result (exit code 3)" in result.content


def test_hermes_calls_and_malformed_attempts():
    parse = get_tool_format("hermes").parse
    text = (
        'Let me compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 2}"}</tool_call>'
    )
    calls, errors = parse(text)
    assert calls == [ToolCall("add", {"a": 1}), ToolCall("add", {"a": 2})] and errors == []
    assert parse("The answer is 4.") == ([], [])
    bad = {
        '<tool_call>{"name": "add", "arguments": {"a": }}</tool_call>': "not valid JSON",
        '<tool_call>{"arguments": {}}</tool_call>': 'needs a "name"',
        '<tool_call>["add"]</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "add", "arguments": [1]}</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "add"': "not closed",
    }
    for text, message in bad.items():
        calls, errors = parse(text)
        assert calls == [] and len(errors) == 1 and message in errors[0]


def test_json_format():
    parse = get_tool_format("json").parse
    assert parse('{"name": "add", "parameters": {"a": 1}}') == ([ToolCall("add", {"a": 1})], [])
    assert parse("It is 4.") == ([], [])
    assert parse('{"answer": 4}') == ([], [])
    assert parse('{"name": "add", "parameters": {"a": ')[1]


def test_the_format_follows_the_chat_template():
    qwen2, smollm2 = chat_tokenizer("qwen2"), chat_tokenizer("smollm2")
    assert detect_tool_format(qwen2) == "hermes" and renders_tools(qwen2)
    assert detect_tool_format(smollm2) == "hermes" and not renders_tools(smollm2)
    assert not renders_tools(load_tiny_tokenizer())


def test_calculator():
    assert calculator("347 * 29") == "10063"
    assert calculator("(1 + 2) / 4") == "0.75" and calculator("8 / 2") == "4"
    assert calculator("2 ^ 10") == "1024" and calculator("-3 + 1") == "-2"
    for bad, message in {
        "__import__('os')": "not arithmetic",
        "2 ** 1000": "exponents above 64",
        "1 +": "cannot parse",
        "x * 2": "not arithmetic",
    }.items():
        with pytest.raises(ValueError, match=message):
            calculator(bad)
    result = ToolBox([calculator]).call(ToolCall("calculator", {"expression": "1/0"}))
    assert result.error and "ZeroDivisionError" in result.content
