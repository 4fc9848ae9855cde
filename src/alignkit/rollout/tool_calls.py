"""Tool calls in the model's own format: parsing an assistant message, and telling the model how
to call when its chat template cannot.

A format is registered by name (``register_tool_format``) with two functions:

- ``parse(text) -> (calls, errors)``: the calls the message makes, and one error text per
  malformed attempt (a call that is not closed, not JSON, has no name or arguments that are not
  an object); a message with neither is a final answer;
- ``instructions(schemas) -> str``: system-prompt text describing the tools and the format, used
  only when the chat template ignores ``tools=`` (SmolLM2's does);
- ``write(call) -> str``: a call as the model would write it (demonstrations in a prompt).

:func:`detect_tool_format` picks the format from the tokenizer's chat template: a template that
writes ``<tool_call>`` (Qwen2.5, Qwen3, Hermes, SmolLM3) is ``hermes``; one that renders tools
but no tag (Llama 3.1/3.2: a bare JSON object with ``parameters``) is ``json``; a template that
does not render tools at all gets ``hermes`` and its instructions in the system message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.errors import ConfigError
from alignkit.rollout.tools import ToolCall

__all__ = [
    "ToolCallFormat",
    "detect_tool_format",
    "get_tool_format",
    "register_tool_format",
    "renders_tools",
]

Parsed = tuple[list[ToolCall], list[str]]


@dataclass(frozen=True)
class ToolCallFormat:
    """A registered format: its name, parser and instructions (see the module docstring)."""

    name: str
    parse: Callable[[str], Parsed]
    instructions: Callable[[Sequence[dict[str, Any]]], str]
    write: Callable[[ToolCall], str]


_FORMATS: dict[str, ToolCallFormat] = {}


def register_tool_format(
    name: str,
    instructions: Callable[[Sequence[dict[str, Any]]], str],
    write: Callable[[ToolCall], str],
) -> Callable[[Callable[[str], Parsed]], Callable[[str], Parsed]]:
    """Register ``parse`` (decorated) with ``instructions`` and ``write`` as the format
    ``name``."""

    def decorate(parse: Callable[[str], Parsed]) -> Callable[[str], Parsed]:
        _FORMATS[name] = ToolCallFormat(name, parse, instructions, write)
        return parse

    return decorate


def get_tool_format(name: str) -> ToolCallFormat:
    if name not in _FORMATS:
        raise ConfigError(
            f"unknown tool-call format '{name}'; registered: {', '.join(sorted(_FORMATS))}"
        )
    return _FORMATS[name]


def _call_from_object(payload: Any, arguments_key: str = "arguments") -> ToolCall | str:
    """A ToolCall from a decoded ``{"name": ..., "arguments": {...}}``, or what is wrong."""
    if not isinstance(payload, dict):
        return f"a tool call must be a JSON object, got {type(payload).__name__}"
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return 'a tool call needs a "name" (a string)'
    arguments = payload.get(arguments_key, payload.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f'the "{arguments_key}" of tool call "{name}" are not a JSON object'
    if not isinstance(arguments, dict):
        return f'the "{arguments_key}" of tool call "{name}" must be a JSON object'
    return ToolCall(name, arguments)


def _decode(payload: str, arguments_key: str = "arguments") -> ToolCall | str:
    try:
        decoded = json.loads(payload)
    except json.JSONDecodeError as err:
        return (
            f"the tool call is not valid JSON ({err.msg} at character {err.pos}): {payload[:200]}"
        )
    return _call_from_object(decoded, arguments_key)


def _split(results: Sequence[ToolCall | str]) -> Parsed:
    return [r for r in results if isinstance(r, ToolCall)], [
        r for r in results if isinstance(r, str)
    ]


def _hermes_instructions(schemas: Sequence[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return (
        "You can call these tools:\n<tools>\n"
        f"{listed}\n</tools>\n"
        "To call a tool, write only\n"
        '<tool_call>\n{"name": <tool name>, "arguments": <arguments as a JSON object>}\n'
        "</tool_call>\n"
        "and its result comes back in the next message. When you know the answer, reply "
        "without a tool call."
    )


_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _hermes_write(call: ToolCall) -> str:
    # As Qwen2.5's template renders a structured call.
    payload = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


@register_tool_format("hermes", _hermes_instructions, _hermes_write)
def parse_hermes(text: str) -> Parsed:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, any number."""
    results: list[ToolCall | str] = [_decode(m.strip()) for m in _HERMES_CALL.findall(text)]
    unclosed = text.count("<tool_call>") - text.count("</tool_call>")
    if unclosed > 0:
        results.append("a <tool_call> is not closed by </tool_call>")
    return _split(results)


def _json_instructions(schemas: Sequence[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return (
        f"You can call these functions:\n{listed}\n"
        'To call one, reply with only {"name": <function name>, "parameters": <arguments>}. '
        "When you know the answer, reply in words."
    )


def _json_write(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "parameters": call.arguments}, ensure_ascii=False)


@register_tool_format("json", _json_instructions, _json_write)
def parse_json(text: str) -> Parsed:
    """A message that is one JSON object ``{"name": ..., "parameters": {...}}`` (Llama 3.1/3.2;
    ``arguments`` is accepted too); any other message is an answer."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return [], []
    try:
        decoded = json.loads(stripped)
    except json.JSONDecodeError:
        if '"name"' not in stripped:
            return [], []
        return [], [f"the function call is not valid JSON: {stripped[:200]}"]
    if not isinstance(decoded, dict) or "name" not in decoded:
        return [], []
    return _split([_call_from_object(decoded, "parameters")])


def _probe_tool(probe_argument: str) -> str:
    """Alignkit's probe tool.

    Args:
        probe_argument: a probe.
    """
    return probe_argument


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes the ``tools=`` it is given."""
    from alignkit.rollout.tools import tool_schema

    messages = [{"role": "user", "content": "x"}]
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=[tool_schema(_probe_tool)], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that rejects tools renders none
        return False
    return "_probe_tool" in text


def detect_tool_format(tokenizer: Any) -> str:
    """The format name for the tokenizer's chat template (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # several named templates
        template = "\n".join(template.values()) if isinstance(template, dict) else ""
    if "<tool_call>" in template:
        return "hermes"
    if renders_tools(tokenizer) and '"parameters"' in template:
        return "json"
    return "hermes"
