"""Built-in reward functions: the verifiable tasks' verifiers and the assistant task's judges.

Each has TRL's signature ``fn(prompts, completions, **row_fields) -> list[float | None]`` and is
registered by name (``function: reverse_match`` in a config). They double as examples of the
reward API: a conversational row's prompt and completion come as message lists, so each reads
the text through ``completion_text`` (and the judges take either form of prompt).

Partial credit for the digit tasks (``alignkit.data.synthetic.verifiable``): with the completion
``c`` (surrounding whitespace stripped) and the answer ``a``,
``score = #{i : c[i] == a[i]} / max(len(a), len(c))``: 1 only for the exact answer, and a
completion that runs on (no EOS) or stops early loses the positions it misses. Addition aligns
the digits from the right (units with units).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignkit.rollout.registry import completion_text, register_reward

__all__ = [
    "add_match",
    "assistant_helpfulness",
    "assistant_safety_cost",
    "exact_match",
    "position_match",
    "reverse_match",
    "sort_match",
]


def position_match(completion: str, answer: str, from_right: bool = False) -> float:
    """Fraction of the answer's positions the completion gets right (see the module docstring)."""
    completion, answer = completion.strip(), str(answer)
    longest = max(len(completion), len(answer))
    if longest == 0:
        return 1.0
    if from_right:
        completion, answer = completion[::-1], answer[::-1]
    return sum(c == a for c, a in zip(completion, answer, strict=False)) / longest


def _match(completions: Sequence[Any], answer: Sequence[Any], from_right: bool) -> list[float]:
    return [
        position_match(completion_text(c), a, from_right)
        for c, a in zip(completions, answer, strict=True)
    ]


@register_reward("reverse_match")
def reverse_match(
    prompts: list[str], completions: list[str], answer: list[str], **_: Any
) -> list[float]:
    """Digit reversal: fraction of positions right, 1.0 for the exact reversal."""
    return _match(completions, answer, from_right=False)


@register_reward("sort_match")
def sort_match(
    prompts: list[str], completions: list[str], answer: list[str], **_: Any
) -> list[float]:
    """Digit sorting: fraction of positions right, 1.0 for the sorted digits."""
    return _match(completions, answer, from_right=False)


@register_reward("add_match")
def add_match(
    prompts: list[str], completions: list[str], answer: list[str], **_: Any
) -> list[float]:
    """Addition: fraction of digits right counted from the units, 1.0 for the exact sum."""
    return _match(completions, answer, from_right=True)


@register_reward("exact_match")
def exact_match(
    prompts: list[str], completions: list[str], answer: list[str], **_: Any
) -> list[float]:
    """1.0 when the stripped completion equals the answer, else 0.0 (any task with ``answer``)."""
    return [
        float(completion_text(c).strip() == str(a).strip())
        for c, a in zip(completions, answer, strict=True)
    ]


@register_reward("assistant_helpfulness")
def assistant_helpfulness(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """The synthetic assistant task's helpfulness judge, in [0, 1]."""
    from alignkit.data.synthetic.judges import helpfulness_score

    pairs = zip(prompts, completions, strict=True)
    return [helpfulness_score(p, completion_text(c)) for p, c in pairs]


@register_reward("assistant_safety_cost")
def assistant_safety_cost(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """The synthetic assistant task's safety cost (> 0 unsafe, < 0 safe; Safe RLHF's sign)."""
    from alignkit.data.synthetic.judges import safety_cost

    pairs = zip(prompts, completions, strict=True)
    return [safety_cost(p, completion_text(c)) for p, c in pairs]
