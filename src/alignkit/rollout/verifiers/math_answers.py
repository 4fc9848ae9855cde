"""``math_accuracy`` and ``math_format``: final answers checked by ``math-verify``.

``math_accuracy`` is 1.0 when the completion's final answer equals the row's answer for
``math-verify`` (numbers, fractions, LaTeX expressions, sets, intervals, equations: what TRL's
``accuracy_reward`` and NeMo-RL's math environment use), else 0.0; None (not applicable) when the
row's answer cannot be parsed. The row's answer is a string or a number (column ``answer``, or
``solution`` as in TRL; ``answer_field`` names another); a GSM8K-style ``"... #### 72"`` counts
its part after the last ``####``.

Where the final answer is read (``format``, the same option for both sources):

- ``any``: anywhere after the last ``</think>`` (the whole completion when there is none);
  math-verify's own extraction, a ``\\boxed{}`` first, then LaTeX after an anchor ("the answer
  is"), then the last plain expression;
- ``boxed``: the content of the last ``\\boxed{...}``;
- ``answer_tags``: the content of the last ``<answer>...</answer>``;
- ``think_answer``: the completion must be ``<think>...</think>`` then ``<answer>...</answer>``
  (whitespace around them only); the answer is the tags' content.

A completion without the required format scores 0. ``math_format`` is 1.0 when the completion
has the format (``boxed``, ``answer_tags`` or ``think_answer``; ``any`` has no format and is an
error there), else 0.0: give it a small weight next to ``math_accuracy``.

math-verify bounds each parse and comparison to ``timeout_seconds`` with SIGALRM, which exists
only on the main thread: called from another thread, these sources run without that bound.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from alignkit.rollout.registry import completion_text, register_reward, row_columns
from alignkit.rollout.verifiers.packages import require_package

__all__ = ["FORMATS", "MathAccuracy", "MathFormat", "final_answer", "math_score"]

FORMATS = ("any", "boxed", "answer_tags", "think_answer")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")
_ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_ANSWER = re.compile(
    r"\s*<think>((?:(?!<think>).)*?)</think>\s*<answer>((?:(?!<answer>).)*?)</answer>\s*",
    re.DOTALL,
)


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def final_answer(completion: str, format: str) -> str | None:
    """The text the answer is read from under ``format``, or None when the format is missing."""
    if format == "any":
        return completion.rsplit("</think>", 1)[-1]
    if format == "boxed":
        return _last_boxed(completion)
    if format == "answer_tags":
        found = _ANSWER_TAGS.findall(completion)
        return found[-1] if found else None
    if format == "think_answer":
        match = _THINK_ANSWER.fullmatch(completion)
        return match.group(2) if match else None
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")


def _time_limit() -> int | None:
    """math-verify's per-call limit in seconds: SIGALRM-based, so on the main thread only."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse_plain(text: str, seconds: int | None) -> list[Any]:
    """A bare answer (``72``, ``\\frac{1}{3}``, ``x+1``): as it is, else as inline LaTeX
    unless it holds words (``no answer`` must not become the product n*o*a*...)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    parsed = parse(text, extraction_config=configs, parsing_timeout=seconds)
    if parsed or _WORD.search(_LATEX_COMMAND.sub("", text)):
        return parsed
    return parse(f"${text}$", extraction_config=configs, parsing_timeout=seconds)


def _parse_completion(text: str, seconds: int | None) -> list[Any]:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    latex = LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
    configs = [latex, ExprExtractionConfig()]
    return parse(text, extraction_config=configs, parsing_timeout=seconds)


def math_score(completion: str, answer: Any, format: str = "any") -> float | None:
    """1.0 / 0.0 for one completion against one answer (see the module docstring); None when
    the answer does not parse."""
    from math_verify import verify

    seconds = _time_limit()
    gold_text = str(answer)
    if "####" in gold_text:
        gold_text = gold_text.rsplit("####", 1)[1]
    gold = _parse_plain(gold_text.strip(), seconds)
    if not gold:
        return None
    text = final_answer(completion, format)
    if text is None:
        return 0.0
    predicted = (
        _parse_completion(text, seconds) if format == "any" else _parse_plain(text.strip(), seconds)
    )
    if not predicted:
        return 0.0
    return float(verify(gold, predicted, timeout_seconds=seconds))


def _answers(fields: dict[str, Sequence[Any]], answer_field: str | None) -> Sequence[Any]:
    names = [answer_field] if answer_field else [n for n in ("answer", "solution") if n in fields]
    if len(names) != 1 or names[0] not in fields:
        wanted = f"'{answer_field}'" if answer_field else "'answer' or 'solution' (one of them)"
        raise KeyError(
            f"math_accuracy needs the column {wanted} (options.answer_field names another); "
            f"the rows have: {', '.join(sorted(fields)) or 'no other column'}"
        )
    return fields[names[0]]


def _check_format(format: str, allowed: Sequence[str]) -> str:
    if format not in allowed:
        raise ValueError(f"format must be one of {', '.join(allowed)}, got {format!r}")
    return format


@register_reward("math_accuracy")
class MathAccuracy:
    """1.0 when the final answer matches the row's answer (math-verify), else 0.0; None when
    the row's answer does not parse. Options: ``format`` (where the answer is read: any, boxed,
    answer_tags, think_answer) and ``answer_field`` (default: ``answer`` or ``solution``)."""

    def __init__(self, *, format: str = "any", answer_field: str | None = None) -> None:
        require_package("math_verify", "math-verify", "math_accuracy")
        self.format = _check_format(format, FORMATS)
        self.answer_field = answer_field

    def __call__(
        self, prompts: list[str], completions: list[str], **fields: Any
    ) -> list[float | None]:
        answers = _answers(row_columns(fields), self.answer_field)
        pairs = zip(completions, answers, strict=True)
        return [math_score(completion_text(c), a, self.format) for c, a in pairs]


@register_reward("math_format")
class MathFormat:
    """1.0 when the completion has the ``format`` (boxed, answer_tags, think_answer; default
    think_answer), else 0.0."""

    def __init__(self, *, format: str = "think_answer") -> None:
        self.format = _check_format(format, FORMATS[1:])

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [
            float(final_answer(completion_text(c), self.format) is not None) for c in completions
        ]
