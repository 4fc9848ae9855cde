"""Tools for environments: plain Python functions, their JSON schemas, and calls with limits.

A tool is a function with type hints and a Google-style docstring (one ``Args:`` line per
parameter); its JSON schema comes from them through transformers' ``get_json_schema``, the
format chat templates' ``tools=`` and TRL expect::

    def calculator(expression: str) -> str:
        \"\"\"Evaluate an arithmetic expression.

        Args:
            expression: digits, + - * / ( ) and spaces, e.g. "347 * 29".
        \"\"\"

A bound method works too (its ``self`` is not a parameter), so an environment's tools can keep
per-episode state. :class:`ToolBox` calls them as the model asked: nothing the model writes
crashes the run. An unknown tool, arguments that do not bind to the signature, an exception, or
a call that outlives its timeout each becomes a :class:`ToolResult` with ``error=True`` whose
text (``"error: ..."``) goes back to the model as the tool's message.

Timeouts: ``isolation="thread"`` (default) runs the call in a daemon thread and stops waiting
after ``timeout`` seconds (a runaway function keeps its thread until it returns: fine for
functions that wait on I/O, not for ones that can loop forever); ``isolation="process"`` runs it
in a forked child that is killed at the timeout (the result must be made in the child, so it is
formatted there; costs a fork per call).
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.errors import AlignkitError

__all__ = [
    "Tool",
    "ToolBox",
    "ToolCall",
    "ToolDefinitionError",
    "ToolResult",
    "as_tool",
    "format_tool_output",
    "tool_schema",
]

Isolation = Literal["thread", "process"]


class ToolDefinitionError(AlignkitError):
    """A tool's schema cannot be made (a parameter without a type hint or without a line in the
    docstring's ``Args:``). Exit code 2, naming the function."""


@dataclass(frozen=True)
class ToolCall:
    """A call the model wrote: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """What goes back to the model: the tool's name and the message text; ``error`` when the
    call failed (malformed, unknown tool, bad arguments, raised, timed out, over the limit)."""

    name: str
    content: str
    error: bool = False


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema ``{"type": "function", "function": {name, description, parameters}}`` of
    ``fn`` from its signature and docstring (transformers' ``get_json_schema``)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # DocstringParsingException, TypeHintParsingException
        name = getattr(fn, "__qualname__", repr(fn))
        raise ToolDefinitionError(
            f"tool '{name}': {err} (a tool needs a type hint on every parameter and a "
            "Google-style docstring with a description and one 'Args:' line per parameter)"
        ) from None


@dataclass(frozen=True)
class Tool:
    """A callable, its name and its schema (see the module docstring)."""

    fn: Callable[..., Any]
    name: str
    schema: dict[str, Any]


def as_tool(fn: Callable[..., Any] | Tool) -> Tool:
    """``fn`` with its name and schema (a :class:`Tool` is returned as it is)."""
    if isinstance(fn, Tool):
        return fn
    schema = tool_schema(fn)
    return Tool(fn=fn, name=schema["function"]["name"], schema=schema)


def format_tool_output(value: Any, max_chars: int) -> str:
    """A tool's return value as message text: a string as it is, anything else as JSON (numbers
    as ``84``, not ``84.0`` unless they are floats), cut to ``max_chars`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > max_chars:
        text = text[:max_chars] + f"... [cut at {max_chars} characters]"
    return text


class ToolBox:
    """The tools of one episode, called with a timeout and a cap on the output's length.

    Args:
        tools: functions (or :class:`Tool`); names must be distinct.
        timeout: seconds per call.
        isolation: ``thread`` or ``process`` (see the module docstring).
        max_output_chars: a longer result is cut (the model's context is finite).
    """

    def __init__(
        self,
        tools: Sequence[Callable[..., Any] | Tool],
        *,
        timeout: float = 10.0,
        isolation: Isolation = "thread",
        max_output_chars: int = 4000,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"tool timeout must be > 0, got {timeout}")
        if isolation not in ("thread", "process"):
            raise ValueError(f"tool isolation must be 'thread' or 'process', got {isolation!r}")
        self.tools: dict[str, Tool] = {}
        for tool in map(as_tool, tools):
            if tool.name in self.tools:
                raise ToolDefinitionError(f"two tools are named '{tool.name}'")
            self.tools[tool.name] = tool
        self.timeout = timeout
        self.isolation = isolation
        self.max_output_chars = max_output_chars

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema for tool in self.tools.values()]

    def call(self, call: ToolCall) -> ToolResult:
        """Run one call; every failure is a result with ``error=True``, never an exception."""
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return _error(call.name, f"there is no tool named '{call.name}' (tools: {known})")
        if not isinstance(call.arguments, Mapping):
            return _error(call.name, "the arguments must be a JSON object")
        try:
            inspect.signature(tool.fn).bind(**call.arguments)
        except TypeError as err:
            return _error(call.name, f"bad arguments {json.dumps(call.arguments)}: {err}")
        run = _in_thread if self.isolation == "thread" else _in_process
        ok, text = run(tool.fn, dict(call.arguments), self.timeout, self.max_output_chars)
        return ToolResult(call.name, text if ok else f"error: {text}", error=not ok)


def _error(name: str, message: str) -> ToolResult:
    return ToolResult(name, f"error: {message}", error=True)


def _outcome(fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int) -> tuple[bool, str]:
    try:
        return True, format_tool_output(fn(**arguments), max_chars)
    except Exception as err:  # the tool's own failure goes back to the model
        return False, f"{type(err).__name__}: {err}"


def _in_thread(
    fn: Callable[..., Any], arguments: dict[str, Any], timeout: float, max_chars: int
) -> tuple[bool, str]:
    box: list[tuple[bool, str]] = []
    worker = threading.Thread(
        target=lambda: box.append(_outcome(fn, arguments, max_chars)), daemon=True
    )
    worker.start()
    worker.join(timeout)
    if not box:
        return False, f"the call timed out after {timeout:g} s"
    return box[0]


def _in_process(
    fn: Callable[..., Any], arguments: dict[str, Any], timeout: float, max_chars: int
) -> tuple[bool, str]:
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        send.send(_outcome(fn, arguments, max_chars))

    process = context.Process(target=child, daemon=True)
    process.start()
    send.close()
    try:
        if receive.poll(timeout):
            return receive.recv()
        return False, f"the call timed out after {timeout:g} s"
    except EOFError:  # the child died without answering (os._exit, a signal)
        process.join(timeout)
        return False, f"the tool's process ended without a result (exit code {process.exitcode})"
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()
