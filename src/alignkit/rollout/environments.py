"""Environments: what the policy talks to in a multi-turn rollout.

An environment is a small class (one instance per episode, built with the config's ``options``)::

    class Environment(Protocol):
        tools: Sequence[Callable]                          # may be empty
        def reset(self, row) -> list[dict]: ...            # the prompt row -> the first messages
        def step(self, message) -> Step: ...               # the model's message -> what follows

``reset`` gets the prompt file's row (``prompt`` and the other columns) and returns the messages
the policy sees first (samples of one prompt must get the same ones). ``step`` gets each
assistant message that makes no tool call (``{"role": "assistant", "content": text}``) and
returns a :class:`Step`: the environment's reply messages (a user's next question; none when it
ends), a reward (None: none at this step) and ``done``. Tool calls never reach ``step``: the
rollout parses them in the model's own format and runs ``tools`` (``rollout.tools.ToolBox``:
limits, timeouts, errors back to the model), then samples the next assistant turn.

The episode's reward is the sum of the steps' rewards (0 when there were none: a limit ended
the episode before the environment rewarded it) plus the config's ``rewards`` sources applied to
the last assistant message (TRL's ``fn(prompts, completions, **row_fields)``, the completion
being that message's text; a source's None makes the row "not applicable", NaN).

:class:`Environment` is a base class with those defaults: the row's own prompt, no tools, and a
``step`` that ends the episode without a reward. With no tools it is the single-turn case: one
assistant message, scored by the reward sources, which is what the trainer does without an
``environment``. :class:`Calculator` adds one tool. Register a class with
``register_environment(name)``; a config names it (``environment: {name: calculator}``), or a
class as ``module:Class`` / ``path/to/file.py:Class``.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alignkit.errors import ConfigError, DataError

__all__ = [
    "DEMONSTRATION",
    "Calculator",
    "Environment",
    "EnvironmentProtocol",
    "Step",
    "calculator",
    "environment_factory",
    "register_environment",
    "registered_environments",
    "row_messages",
]

Message = dict[str, Any]


@dataclass
class Step:
    """What follows an assistant message: the environment's messages, a reward, whether the
    episode ends."""

    messages: list[Message] = field(default_factory=list)
    reward: float | None = None
    done: bool = False


@runtime_checkable
class EnvironmentProtocol(Protocol):
    tools: Sequence[Callable[..., Any]]

    def reset(self, row: Mapping[str, Any]) -> list[Message]: ...

    def step(self, message: Message) -> Step: ...


def row_messages(row: Mapping[str, Any], system: str | None = None) -> list[Message]:
    """The row's ``prompt`` as chat messages (a string becomes one user message), after a
    ``system`` message when given and the prompt has none."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise DataError(f"environment: the row's 'prompt' is not a text or messages: {prompt!r}")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


class Environment:
    """The base class (see the module docstring): the row's prompt, no tools, one answer.

    Args:
        system: a system message put before the row's prompt (when it has none).
    """

    tools: Sequence[Callable[..., Any]] = ()

    def __init__(self, *, system: str | None = None) -> None:
        self.system = system

    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        self.row = dict(row)
        return row_messages(row, self.system)

    def step(self, message: Message) -> Step:
        return Step(done=True)


_REGISTRY: dict[str, type] = {}


def register_environment(name: str) -> Callable[[type], type]:
    """Register an environment class under ``name`` (``environment: {name: ...}``)."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"environment '{name}' is already registered")
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_environments() -> dict[str, type]:
    return dict(_REGISTRY)


register_environment("single_turn")(Environment)


def _import_class(spec: str) -> Any:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"environment '{spec}': file {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"alignkit_user_env_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:  # a user's file: report, do not trace back
            raise ConfigError(f"environment '{spec}': importing {path} failed: {err!r}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ConfigError(f"environment '{spec}': cannot import {target}: {err}") from None
    return getattr(module, attr, None)


def environment_factory(spec: str, options: Mapping[str, Any] | None = None) -> Callable[[], Any]:
    """A function making one environment per episode: the class named by ``spec`` (a registered
    name, ``module:Class`` or ``path/file.py:Class``) called with ``options``."""
    options = dict(options or {})
    if spec in _REGISTRY:
        cls = _REGISTRY[spec]
    elif ":" in spec:
        cls = _import_class(spec)
    else:
        near = difflib.get_close_matches(spec, list(_REGISTRY), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(
            f"unknown environment '{spec}': {hint}use a registered one "
            f"({', '.join(sorted(_REGISTRY))}), 'module:Class' or 'path/to/file.py:Class'"
        )
    if not inspect.isclass(cls):
        raise ConfigError(f"environment '{spec}' is not a class")
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise ConfigError(f"environment '{spec}': bad options {options!r} ({err})") from None
    first = cls(**options)
    if not isinstance(first, EnvironmentProtocol):
        raise ConfigError(
            f"environment '{spec}' needs 'tools', 'reset(row)' and 'step(message)' "
            "(subclass alignkit.rollout.environments.Environment)"
        )
    return lambda: cls(**options)


# --------------------------------------------------------------------------------------
# The calculator


_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponents above 64 are not allowed")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "347 * 29".
    """
    try:
        value = _evaluate(ast.parse(expression.replace("^", "**").strip(), mode="eval"))
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


#: The calculator's demonstration: one solved question, the call written in the model's format.
DEMONSTRATION: list[Message] = [
    {
        "role": "user",
        "content": "Solve the following multiplication: 12 * 34. Give only the result as your final answer.",
    },
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "calculator", "arguments": {"expression": "12 * 34"}},
            }
        ],
    },
    {"role": "tool", "name": "calculator", "content": "408"},
    {"role": "assistant", "content": "408"},
]


@register_environment("calculator")
class Calculator(Environment):
    """The row's arithmetic question with a ``calculator`` tool; the answer is scored by the
    reward sources (e.g. ``math_accuracy`` against the row's ``answer``).

    Args:
        system: a system message before the row's prompt (the tool's instructions follow it
            when the chat template does not render tools).
        demonstration: put one solved example (:data:`DEMONSTRATION`: a question, the call,
            its result, the answer) before the question, as earlier turns of the conversation.
    """

    tools = (calculator,)

    def __init__(self, *, system: str | None = None, demonstration: bool = False) -> None:
        super().__init__(system=system)
        self.demonstration = demonstration

    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        messages = super().reset(row)
        if not self.demonstration:
            return messages
        at = 1 if messages[0]["role"] == "system" else 0
        return [*messages[:at], *DEMONSTRATION, *messages[at:]]
