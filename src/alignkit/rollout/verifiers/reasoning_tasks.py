"""``reasoning_gym:<task>``: the procedural tasks of the ``reasoning-gym`` package.

Prompts: ``reasoning_gym_rows(task, size, seed, **config)`` (or ``alignkit data reasoning-gym``)
generates rows offline, deterministic in (task, size, seed, config)::

    {"prompt": [{"role": "user", "content": question}], "answer": str,
     "metadata": {...}, "task": task, "task_config": {...}}

(``task_config`` holds the task's settings with ``seed`` and ``size``.)

Reward: ``reasoning_gym:<task>`` scores a completion with the task's own ``score_answer``
(reasoning-gym's scale, in [0, 1]; some tasks give partial credit). The entry it scores against
is regenerated from the row's ``task_config`` and ``metadata.source_index``, so the scorer gets
the objects it made (some compare tuples, which JSON turns into lists); the row's ``answer`` must
equal the regenerated one (else the package version changed: an error). A row without those
(written by other tools) is scored against its own ``answer`` and ``metadata`` by the task's
dataset built with the ``config`` option (default: the task's defaults). The answer read from
a completion (``extract``): ``answer_tags``: the content of the last ``<answer>...</answer>``
(reasoning-gym's own convention; none scores 0); ``whole``: the completion after the last
``</think>``, stripped; ``auto`` (default): the tags when present, else ``whole``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from alignkit.errors import ConfigError
from alignkit.rollout.registry import completion_text, register_reward_family
from alignkit.rollout.verifiers.packages import require_package

__all__ = ["ReasoningGymReward", "reasoning_gym_rows", "reasoning_gym_tasks", "score_answer"]

EXTRACTS = ("auto", "answer_tags", "whole")


def reasoning_gym_tasks() -> list[str]:
    """Every task name reasoning-gym registers."""
    require_package("reasoning_gym", "reasoning-gym", "reasoning_gym")
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _check_task(task: str) -> str:
    tasks = reasoning_gym_tasks()
    if task not in tasks:
        near = difflib.get_close_matches(task, tasks, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ConfigError(
            f"reasoning-gym has no task '{task}'{hint}; `alignkit data reasoning-gym --list` "
            "prints them"
        )
    return task


def _json_safe(value: Any) -> Any:
    """What a JSONL round trip gives back (tuples become lists; other objects their str)."""
    return json.loads(json.dumps(value, default=str))


@lru_cache(maxsize=64)
def _dataset(task: str, config_json: str) -> Any:
    import reasoning_gym

    config = {"size": 1, "seed": 0, **json.loads(config_json)}
    try:
        return reasoning_gym.create_dataset(task, **config)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"reasoning_gym:{task}: bad config {config_json}: {err}") from None


@lru_cache(maxsize=8)
def _entries(task: str, config_json: str) -> dict[int, dict[str, Any]]:
    """The task's entries by ``metadata.source_index``, as iterating the dataset makes them
    (what ``reasoning_gym_rows`` wrote; some tasks skip indices, so ``dataset[i]`` differs)."""
    return {e["metadata"]["source_index"]: e for e in _dataset(task, config_json)}


def reasoning_gym_rows(
    task: str,
    size: int,
    seed: int,
    *,
    system: str | None = None,
    instruction: str | None = None,
    chat: bool = True,
    **config: Any,
) -> list[dict[str, Any]]:
    """``size`` prompt rows of ``task`` (see the module docstring); ``config`` is the task's
    own settings (its difficulty: ``min_terms``, ``max_digits``, ...). ``system`` is a system
    message (a reasoning-gym prompt name such as ``default``, or the text itself);
    ``instruction`` is appended to each question; ``chat=False`` writes plain-text prompts."""
    _check_task(task)
    if size < 1:
        raise ConfigError(f"reasoning-gym rows: size must be >= 1, got {size}")
    import reasoning_gym
    from reasoning_gym.utils import SYSTEM_PROMPTS

    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"reasoning_gym:{task}: bad config {config}: {err}") from None
    system_text = SYSTEM_PROMPTS.get(system, system) if system else None
    task_config = _json_safe({**config, "seed": seed, "size": size})
    rows = []
    for entry in dataset:
        question = entry["question"] + (f"\n{instruction}" if instruction else "")
        if chat:
            messages = [{"role": "system", "content": system_text}] if system_text else []
            prompt: Any = [*messages, {"role": "user", "content": question}]
        else:
            prompt = f"{system_text}\n\n{question}" if system_text else question
        rows.append(
            {
                "prompt": prompt,
                "answer": entry["answer"],
                "metadata": _json_safe(entry["metadata"]),
                "task": task,
                "task_config": task_config,
            }
        )
    return rows


def _extract(completion: str, extract: str) -> str | None:
    from reasoning_gym.utils import extract_answer

    if extract != "whole":
        tagged = extract_answer(completion, tag_name="answer")
        if tagged is not None or extract == "answer_tags":
            return tagged
    return completion.rsplit("</think>", 1)[-1].strip()


def score_answer(
    task: str, answer: str | None, row: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> float:
    """The task's own score of ``answer`` for a prompt row (``answer``, ``metadata`` and, from
    ``reasoning_gym_rows``, ``task_config``; see the module docstring for which entry is used)."""
    metadata = row.get("metadata") or {}
    task_config = row.get("task_config")
    index = metadata.get("source_index") if isinstance(metadata, Mapping) else None
    if isinstance(task_config, Mapping) and "seed" in task_config and isinstance(index, int):
        config_json = json.dumps(dict(task_config), sort_keys=True)
        entry = _entries(task, config_json).get(index)
        if entry is None or _json_safe(entry["answer"]) != row.get("answer"):
            theirs = "no entry" if entry is None else repr(entry["answer"])[:60]
            raise ValueError(
                f"the row's answer {row.get('answer')!r:.60} is not reasoning-gym's ({theirs}) "
                f"for {task} #{index} (another reasoning-gym version?)"
            )
    else:
        config_json = json.dumps(dict(config or {}), sort_keys=True)
        entry = {"answer": row.get("answer"), "metadata": metadata}
    return float(_dataset(task, config_json).score_answer(answer, entry))


@register_reward_family("reasoning_gym")
class ReasoningGymReward:
    """Reward ``reasoning_gym:<task>`` (see the module docstring). Options: ``extract`` (auto,
    answer_tags, whole) and ``config`` (the task's settings, for rows without ``task_config``)."""

    def __init__(
        self, task: str, *, extract: str = "auto", config: Mapping[str, Any] | None = None
    ) -> None:
        self.task = _check_task(task)
        if extract not in EXTRACTS:
            raise ValueError(f"extract must be one of {', '.join(EXTRACTS)}, got {extract!r}")
        self.extract = extract
        self.config = dict(config or {})
        _dataset(self.task, json.dumps(self.config, sort_keys=True))  # a bad config fails now

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        answer: list[Any] | None = None,
        metadata: list[Any] | None = None,
        task: list[Any] | None = None,
        task_config: list[Any] | None = None,
        **_: Any,
    ) -> list[float]:
        if answer is None:
            raise KeyError(
                f"reasoning_gym:{self.task} needs the column 'answer' (write the prompts with "
                "`alignkit data reasoning-gym`)"
            )
        columns = {"metadata": metadata, "task_config": task_config}
        scores = []
        for i, completion in enumerate(completions):
            if task is not None and task[i] is not None and task[i] != self.task:
                raise ValueError(
                    f"sample {i} is a '{task[i]}' row, scored by reasoning_gym:{self.task}"
                )
            row = {"answer": answer[i]} | {k: v[i] for k, v in columns.items() if v is not None}
            extracted = _extract(completion_text(completion), self.extract)
            scores.append(score_answer(self.task, extracted, row, self.config))
        return scores
