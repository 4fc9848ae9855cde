"""Built-in reward functions by name (``function: sort_match`` in a config), and the pieces of
the reward-function contract that every reward module shares.

A reward function registered here has TRL's signature ``fn(prompts, completions, **row_fields)
-> list[float | None]`` (``rollout.rewards`` describes the contract); ``rollout.tasks`` holds
the bundled tasks' verifiers and judges, ``rollout.verifiers`` math, code, reasoning-gym and
LLM-judge rewards. Adding one is one decorated function (or a class built with ``options``); a
family registered with :func:`register_reward_family` answers every ``prefix:<name>``.

As in TRL, a conversational row's prompt and completion arrive as message lists and a plain
row's as strings, and the keyword arguments hold TRL's extras (``completion_ids``,
``trainer_state``, ``log_extra``, ``log_metric``) besides the row's columns:
:func:`completion_text`, :func:`prompt_text` and :func:`row_columns` give a built-in the text
and the columns whatever the row's style.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from alignkit.errors import AlignkitError

__all__ = [
    "TRL_EXTRAS",
    "RewardFn",
    "RewardFunctionError",
    "completion_text",
    "describe_sample",
    "prompt_text",
    "register_reward",
    "register_reward_family",
    "registered_rewards",
    "reward_families",
    "row_columns",
    "shorten",
]

RewardFn = Callable[..., Sequence[Any]]
_REGISTRY: dict[str, RewardFn] = {}
_FAMILIES: dict[str, Callable[..., RewardFn]] = {}
_SHOWN_CHARS = 160
#: Keyword arguments a reward function gets besides the row's columns (TRL 1.16's).
TRL_EXTRAS = ("completion_ids", "trainer_state", "log_extra", "log_metric")


class RewardFunctionError(AlignkitError):
    """A reward function raised, or returned something that is not one number (or None) per
    completion. Exit code 2; the message names the function and shows one sample."""


def shorten(text: Any) -> str:
    """``text`` as a string of at most 160 characters (for error messages)."""
    text = str(text)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def describe_sample(prompts: Sequence[Any], completions: Sequence[Any], i: int) -> str:
    """Sample ``i``'s prompt and completion, shortened, for an error message."""
    return f"\n  prompt: {shorten(prompts[i])!r}\n  completion: {shorten(completions[i])!r}"


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """A completion as text: a string as it is, a message list (a conversational row's
    ``[{"role": "assistant", "content": ...}]``) as its last message's content."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """A prompt as text (for a judge): a string as it is; a message list as its one user
    message's content, or, with several messages, one ``role: content`` line each."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def row_columns(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The row columns among a reward function's keyword arguments (TRL's extras left out)."""
    return {k: v for k, v in kwargs.items() if k not in TRL_EXTRAS}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a built-in reward function (or a class whose constructor takes ``options``)
    under ``name`` (usable as ``function: name``)."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward function '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def register_reward_family(prefix: str) -> Callable[[Callable[..., RewardFn]], Any]:
    """Register ``factory(name, **options) -> reward function`` for every ``prefix:<name>``."""

    def decorate(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if prefix in _FAMILIES and _FAMILIES[prefix] is not factory:
            raise ValueError(f"reward family '{prefix}' is already registered")
        _FAMILIES[prefix] = factory
        return factory

    return decorate


def registered_rewards() -> dict[str, RewardFn]:
    """Reward functions registered so far, by name (``rollout.rewards`` imports
    ``rollout.tasks`` and ``rollout.verifiers``, so the built-ins are there once it is)."""
    return dict(_REGISTRY)


def reward_families() -> dict[str, Callable[..., RewardFn]]:
    """Registered ``prefix:<name>`` families, by prefix."""
    return dict(_FAMILIES)
