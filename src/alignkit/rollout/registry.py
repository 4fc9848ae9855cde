"""Built-in reward functions by name: ``function: sort_match`` in a config.

A reward function registered here has TRL's signature ``fn(prompts, completions, **row_fields)
-> list[float | None]`` (``rollout.rewards`` describes the contract); ``rollout.tasks`` holds
the bundled tasks' verifiers and judges. Adding one is one decorated function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["RewardFn", "register_reward", "registered_rewards"]

RewardFn = Callable[..., Sequence[Any]]
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a built-in reward function under ``name`` (usable as ``function: name``)."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward function '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def registered_rewards() -> dict[str, RewardFn]:
    """Reward functions registered so far, by name (``rollout.rewards`` imports
    ``rollout.tasks``, so the bundled ones are there once it is imported)."""
    return dict(_REGISTRY)
