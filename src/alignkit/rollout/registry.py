"""Built-in reward functions by name (``function: sort_match`` in a config), and the pieces of
the reward-function contract that every reward module shares.

A reward function registered here has TRL's signature ``fn(prompts, completions, **row_fields)
-> list[float | None]`` (``rollout.rewards`` describes the contract); ``rollout.tasks`` holds
the bundled tasks' verifiers and judges, ``rollout.verifiers`` math, code, reasoning-gym and
LLM-judge rewards. Adding one is one decorated function (or a class built with ``options``); a
family registered with :func:`register_reward_family` answers every ``prefix:<name>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alignkit.errors import AlignkitError

__all__ = [
    "RewardFn",
    "RewardFunctionError",
    "describe_sample",
    "register_reward",
    "register_reward_family",
    "registered_rewards",
    "reward_families",
    "shorten",
]

RewardFn = Callable[..., Sequence[Any]]
_REGISTRY: dict[str, RewardFn] = {}
_FAMILIES: dict[str, Callable[..., RewardFn]] = {}
_SHOWN_CHARS = 160


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
