"""Calling a reward function as TRL does, and checking what it returns.

:class:`FunctionReward` turns the trainer's view of a batch (rendered prompt texts, completion
texts, the rows' other columns, and a :class:`RewardContext`) into TRL's keyword arguments
(``rollout.rewards`` states the contract), calls the function with those it takes, and checks
its output (:func:`check_reward_output`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import AlignkitError
from alignkit.rollout.registry import (
    TRL_EXTRAS,
    RewardFn,
    RewardFunctionError,
    describe_sample,
    shorten,
)

__all__ = [
    "FunctionReward",
    "RewardContext",
    "RewardLog",
    "RewardState",
    "check_reward_output",
    "sample_keys",
]

logger = logging.getLogger("alignkit.rewards")


@dataclass(frozen=True)
class RewardState:
    """``trainer_state`` of a reward call, with TRL's ``TrainerState`` names: ``global_step``
    iterations done, of ``max_steps``; ``epoch`` passes over the prompt file so far."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


def _ignore(*_: Any) -> None:
    """A logging hook that records nothing (outside a training iteration)."""


@dataclass
class RewardContext:
    """What a reward call knows beyond texts and columns: the prompts as the data gave them
    (a string, or a conversational row's message list), the sampled ids, the run's state, and
    the logging hooks (``log_extra(column, values)``, ``log_metric(name, value)``)."""

    prompts: Sequence[Any] | None = None
    completion_ids: Sequence[Sequence[int]] | None = None
    trainer_state: RewardState | None = None
    log_extra: Callable[[str, list[Any]], None] = field(default=_ignore)
    log_metric: Callable[[str, float], None] = field(default=_ignore)


def _as_number(value: Any) -> float | str | None:
    """The float of one returned value (NaN included), None for None, or what is wrong."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool:
            return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return f"a bool ({value}); return a number, e.g. float({value})"
    if not isinstance(value, numbers.Real):
        return f"{type(value).__name__} {shorten(repr(value))}, not a number"
    number = float(value)
    if math.isinf(number):
        return f"{number}: a reward must be finite (None means 'not applicable')"
    return number


def check_reward_output(
    name: str, output: Any, prompts: Sequence[Any], completions: Sequence[Any]
) -> Tensor:
    """``[N] float32`` from a reward function's output (None and NaN -> NaN), or
    ``RewardFunctionError``."""
    n = len(completions)
    if isinstance(output, Tensor):
        output = output.detach().cpu().reshape(-1).tolist() if output.dim() <= 1 else output
    elif hasattr(output, "tolist") and not isinstance(output, (list, tuple)):
        output = output.tolist()  # numpy arrays
    if not isinstance(output, (list, tuple)):
        raise RewardFunctionError(
            f"reward function '{name}' returned {type(output).__name__}, not a list of {n} "
            f"numbers (one per completion); first sample:{describe_sample(prompts, completions, 0)}"
        )
    if len(output) != n:
        raise RewardFunctionError(
            f"reward function '{name}' returned {len(output)} values for {n} completions; "
            f"first sample:{describe_sample(prompts, completions, 0)}"
        )
    values: list[float] = []
    for i, value in enumerate(output):
        number = _as_number(value)
        if isinstance(number, str):
            raise RewardFunctionError(
                f"reward function '{name}' returned, for sample {i}, {number}; the sample:"
                f"{describe_sample(prompts, completions, i)}"
            )
        values.append(math.nan if number is None else number)
    return torch.tensor(values, dtype=torch.float32)


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: [row.get(key) for row in rows] for key in keys}


def _await(awaitable: Any) -> Any:
    """The result of a coroutine function's call, with or without a running event loop."""

    async def wait() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with ThreadPoolExecutor(max_workers=1) as pool:  # a notebook's loop is running
        return pool.submit(asyncio.run, wait()).result()


class FunctionReward:
    """A reward function called with TRL's keyword arguments; its output checked each call."""

    def __init__(self, fn: RewardFn, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self._said_nan = False
        try:
            parameters = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: give it everything
            parameters = None
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        takes_all = parameters is None or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
        )
        #: The keyword arguments the function names (None: it takes **kwargs) and needs.
        self.named = None if takes_all else {p.name for p in parameters if p.kind in keyword}
        self.required = (
            set()
            if parameters is None
            else {p.name for p in parameters if p.kind in keyword and p.default is p.empty}
        )

    def arguments(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        rows: Sequence[Mapping[str, Any]],
        context: RewardContext,
    ) -> dict[str, Any]:
        """The keyword arguments of one call: TRL's, then the row columns, those it names."""
        offered: dict[str, Any] = {
            "prompts": prompts,
            "completions": completions,
            "completion_ids": context.completion_ids,
            "trainer_state": context.trainer_state,
            "log_extra": context.log_extra,
            "log_metric": context.log_metric,
        }
        columns = {k: v for k, v in _columns(rows).items() if k not in offered}
        offered |= columns
        missing = sorted(self.required - set(offered))
        if missing:
            raise RewardFunctionError(
                f"reward function '{self.name}' takes '{missing[0]}', which is neither a column "
                f"of the prompt rows ({', '.join(columns) or 'none besides prompt'}) nor one of "
                f"prompts, completions, {', '.join(TRL_EXTRAS)}"
            )
        if self.named is None:
            return offered
        return {k: v for k, v in offered.items() if k in self.named}

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        rows: list[dict[str, Any]],
        *,
        context: RewardContext | None = None,
    ) -> Tensor:
        """Scores ``[N]`` (NaN = not applicable). ``prompts`` are the rendered texts; with a
        ``context`` the function sees the prompts as the data gave them, and a
        conversational row's completion as a message list."""
        context = context or RewardContext()
        given = list(context.prompts) if context.prompts is not None else list(prompts)
        shown = [
            [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            for prompt, text in zip(given, completions, strict=True)
        ]
        arguments = self.arguments(given, shown, rows, context)
        try:
            output = self.fn(**arguments)
            if inspect.isawaitable(output):
                output = _await(output)
        except AlignkitError:  # already names what is wrong (a built-in verifier's own error)
            raise
        except Exception as err:  # the user's code: one line, no traceback
            raise RewardFunctionError(
                f"reward function '{self.name}' raised {type(err).__name__}: {shorten(err)}; "
                f"called on {len(completions)} completions, the first:"
                f"{describe_sample(given, shown, 0)}"
            ) from None
        scores = check_reward_output(self.name, output, given, shown)
        nones = sum(v is None for v in output) if isinstance(output, (list, tuple)) else 0
        nans = int(torch.isnan(scores).sum()) - nones
        if nans and not self._said_nan:
            self._said_nan = True
            logger.warning(
                "reward function '%s' returned NaN for %d of %d samples: treated as None "
                "(not applicable), as TRL does; return None to say so without this note",
                self.name,
                nans,
                len(scores),
            )
        return scores


def sample_keys(groups: Sequence[int]) -> list[tuple[int, int]]:
    """``(group, k)`` of each row: the k-th sample of its prompt's group, in row order; a row
    keeps its key when rows are selected from the batch (dynamic sampling's rounds)."""
    seen: dict[int, int] = {}
    keys = []
    for group in groups:
        seen[group] = seen.get(group, -1) + 1
        keys.append((group, seen[group]))
    return keys


class RewardLog:
    """What reward functions logged in one training iteration: per-sample columns
    (``log_extra``, for the samples table) and metrics (``log_metric``, averaged). Asking for
    another iteration's starts afresh."""

    def __init__(self) -> None:
        self.iteration = -1
        self.extras: dict[tuple[int, int], dict[str, Any]] = {}
        self.metrics: dict[str, list[float]] = {}

    def _at(self, iteration: int) -> None:
        if iteration != self.iteration:
            self.iteration, self.extras, self.metrics = iteration, {}, {}

    def hooks(
        self, iteration: int, groups: Sequence[int]
    ) -> tuple[Callable[[str, list[Any]], None], Callable[[str, float], None]]:
        """``log_extra`` and ``log_metric`` for a call on rows of these ``groups``."""
        self._at(iteration)
        keys = sample_keys(groups)

        def log_extra(column: str, values: list[Any]) -> None:
            if len(values) != len(keys):
                raise ValueError(
                    f"log_extra({column!r}): {len(values)} values, {len(keys)} samples"
                )
            for key, value in zip(keys, values, strict=True):
                self.extras.setdefault(key, {})[column] = value

        def log_metric(name: str, value: float) -> None:
            self.metrics.setdefault(name, []).append(float(value))

        return log_extra, log_metric

    def columns(self, iteration: int, groups: Sequence[int]) -> list[dict[str, Any]]:
        """The logged columns of each row of these ``groups`` (empty dicts when none)."""
        self._at(iteration)
        return [self.extras.get(key, {}) for key in sample_keys(groups)]

    def metric_means(self, iteration: int) -> dict[str, float]:
        """The iteration's ``log_metric`` values averaged per name, once (then emptied)."""
        self._at(iteration)
        means = {name: sum(values) / len(values) for name, values in self.metrics.items()}
        self.metrics = {}
        return means
