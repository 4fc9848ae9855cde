"""Reward sources: user functions (TRL's contract), trained reward/cost models, weighted sums.

A reward function is called once per batch with keywords, as TRL 1.16's GRPO calls it::

    fn(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **row_fields)
        -> list[float | None]

- ``prompts[i]`` and ``completions[i]``: a plain-text prompt row gives strings (the prompt as in
  the file); a conversational row (``"prompt": [{"role": ..., "content": ...}]``) gives the
  prompt's message list and ``[{"role": "assistant", "content": text}]``, so TRL's
  ``completion[0]["content"]`` works unchanged.
- ``completion_ids[i]``: the sampled token ids (EOS included when emitted); ``trainer_state``:
  a :class:`RewardState` (``global_step``, ``max_steps``, ``epoch``, TRL's names); ``log_extra
  (column, values)`` adds a column to the samples table (``samples/iteration-N.jsonl``) and
  ``log_metric(name, value)`` a metric, averaged over the iteration (use the same names on
  every process). Outside a training iteration (evaluation, ``alignkit eval policy``) the two
  hooks record nothing.
- ``row_fields``: the prompt file's other columns, one list per column (``answer=[...]``).

A function that takes ``**kwargs`` gets all of them; one without is called with the arguments
it names (naming one that does not exist is an error that lists what does). A coroutine
function is awaited. Several sources are summed with their weights over the functions that
scored a sample: ``None`` means "not applicable", and a sample is unscored (NaN, left out of
group statistics, advantage 0) only when every source returns None for it (TRL's ``nansum``
rule; multi-task training gives each task's rows to its own function). A NaN returned by a
function is treated as None, as TRL does, and said once per function; infinities are errors.
The output is checked on every call: one entry per completion, each a real number (``int``,
``float``, a numpy or 0-d torch number) or None; ``bool`` is rejected (a comparison returned by
mistake is a common bug: return ``float(ok)``), as are strings. Any failure, or an exception
inside the function, raises ``RewardFunctionError`` naming the function and showing one
offending prompt and completion.

In YAML: ``rewards: [{function: "pkg.mod:fn" | "path/file.py:fn" | "<registered name>",
weight: 1.0, options: {...}}, {model: runs/rm, weight: 0.5}]``; from Python ``function:`` may
also be the callable itself. A function entry may name a class
instead (registered or ``module:Class``): it is built once with ``options`` as keyword arguments
and its instance is the reward function (``options`` on a plain function is an error). A family
registered with ``register_reward_family(prefix)`` answers every ``prefix:<name>`` (e.g.
``reasoning_gym:chain_sum``): its factory is called as ``factory(name, **options)``. A model
entry is a reward or cost model saved by
``alignkit train rm`` / ``train cost`` (its run directory, whose newest checkpoint is used, or
the model directory itself); a cost model's score is its cost (higher = less safe), so give it
a negative weight to penalise cost. An ``alignkit train rm-ensemble`` run directory loads as one
source (``alignkit.models.ensemble``), with optional ``combination`` (mean, weighted, median,
trimmed_mean, stacking) and ``penalty`` k: the combined reward minus k times the members' std.
``{teacher_log_ratio: {teacher: <model>, reference: <model>}}`` is seed 001's reward
(``rollout.model_rewards.TeacherLogRatioReward``). Every model source scores texts through
``models.reward.score_texts`` (one rendering of ``prompt + completion``), given the prompts as
the policy's chat template rendered them.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

import alignkit.rollout.tasks
import alignkit.rollout.verifiers  # noqa: F401  (registers math, code, reasoning-gym, LLM judge)
from alignkit.errors import AlignkitError, ConfigError
from alignkit.models.ensemble import ENSEMBLE_FILE, load_reward_source
from alignkit.rollout.model_rewards import ModelReward, teacher_log_ratio_source
from alignkit.rollout.registry import (
    RewardFn,
    RewardFunctionError,
    registered_rewards,
    reward_families,
)
from alignkit.rollout.reward_functions import (
    FunctionReward,
    RewardContext,
    RewardState,
    check_reward_output,
)

__all__ = [
    "FunctionReward",
    "ModelReward",
    "RewardContext",
    "RewardFunctionError",
    "RewardSource",
    "RewardState",
    "WeightedReward",
    "build_reward_source",
    "check_reward_output",
    "function_name",
    "metric_name",
    "registered_rewards",
    "resolve_reward_function",
    "score_with_context",
]


@runtime_checkable
class RewardSource(Protocol):
    """Scores completions: ``[N] float32`` on CPU, NaN = not applicable. A source whose
    ``__call__`` also takes ``context`` (a :class:`RewardContext`) is given it."""

    name: str

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Tensor: ...


def score_with_context(
    source: RewardSource,
    prompts: list[str],
    completions: list[str],
    rows: list[dict[str, Any]],
    context: RewardContext | None,
) -> Tensor:
    """``source``'s scores, handing it ``context`` when its ``__call__`` takes one (function
    sources and weighted sums do; model sources read texts only)."""
    try:
        takes = "context" in inspect.signature(source.__call__).parameters
    except (TypeError, ValueError):
        takes = False
    if takes and context is not None:
        return source(prompts, completions, rows, context=context)  # type: ignore[call-arg]
    return source(prompts, completions, rows)


def _construct(make: Callable[..., RewardFn], options: Mapping[str, Any], spec: str) -> RewardFn:
    """``make(**options)`` (a reward class or a family's factory), errors naming the option."""
    try:
        inspect.signature(make).bind(**options)
    except TypeError as err:
        accepted = [
            p.name
            for p in inspect.signature(make).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        raise ConfigError(
            f"reward function '{spec}': bad options {dict(options)!r} ({err}); "
            f"accepted: {', '.join(accepted) or 'none'}"
        ) from None
    try:
        return make(**options)
    except AlignkitError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"reward function '{spec}': {err}") from None


def _load_from_file(path: Path, attr: str, spec: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"reward function '{spec}': file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"alignkit_user_reward_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward function '{spec}': cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # a user's file: report, do not trace back
        raise ConfigError(f"reward function '{spec}': importing {path} failed: {err!r}") from None
    return getattr(module, attr, None)


def resolve_reward_function(
    spec: str | RewardFn, options: Mapping[str, Any] | None = None
) -> RewardFn:
    """The callable named by ``module:function``, ``path/file.py:function``, a built-in name or
    ``family:name``, or ``spec`` itself when it is a callable; a class is built with ``options``
    (see the module docstring)."""
    options = dict(options or {})
    if callable(spec):
        fn, spec = spec, function_name(spec)
        if inspect.isclass(fn):
            return _construct(fn, options, spec)
        if options:
            raise ConfigError(f"reward function '{spec}' is a function: it takes no options")
        return fn
    if not isinstance(spec, str):
        raise ConfigError(
            f"reward function {spec!r}: give a callable, 'module:function', "
            "'path/to/file.py:function' or a registered name"
        )
    registry = registered_rewards()
    families = reward_families()
    prefix, _, name = spec.partition(":")
    if spec not in registry and name and prefix in families:
        return _construct(functools.partial(families[prefix], name), options, spec)
    fn = registry[spec] if spec in registry else _import_reward(spec, registry, families)
    if inspect.isclass(fn):
        return _construct(fn, options, spec)
    if options:
        raise ConfigError(
            f"reward function '{spec}' is a function: it takes no options (register a class "
            "whose constructor takes them)"
        )
    return fn


def _import_reward(
    spec: str, registry: Mapping[str, RewardFn], families: Mapping[str, Any]
) -> RewardFn:
    if ":" not in spec:
        near = difflib.get_close_matches(spec, list(registry), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        prefixes = ", ".join(f"{p}:<name>" for p in sorted(families))
        raise ConfigError(
            f"unknown reward function '{spec}': {hint}use 'module:function', "
            f"'path/to/file.py:function' or a built-in ({', '.join(sorted(registry))}; "
            f"{prefixes})"
        )
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py") or "/" in target:
        fn = _load_from_file(Path(target).expanduser(), attr, spec)
    else:
        try:
            fn = getattr(importlib.import_module(target), attr, None)
        except ImportError as err:
            raise ConfigError(f"reward function '{spec}': cannot import {target}: {err}") from None
    if not callable(fn):
        raise ConfigError(f"reward function '{spec}': {target} has no function '{attr}'")
    return fn


def function_name(fn: Any) -> str:
    """A callable's name: its ``__name__``, or its class' for an instance."""
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def metric_name(spec: Mapping[str, Any], source: RewardSource) -> str:
    """A source's name in ``reward/<name>/mean``: a function's own name (``fn`` of
    ``my_reward.py:fn``), a registered name as it is (``reasoning_gym:chain_sum`` too), a
    model's directory name; characters
    other than letters, digits, ``_.-`` become ``_`` (TensorBoard's tag alphabet)."""
    function = spec.get("function")
    if callable(function):
        name = function_name(function)
    elif isinstance(function, str):
        target, _, attr = function.rpartition(":")
        # `path.py:fn` and `module:fn` by the function; a family's `prefix:<name>` in full
        name = attr if target and target not in reward_families() else function
    elif "model" in spec:
        name = Path(str(spec["model"])).expanduser().name or str(spec["model"])
    else:
        name = source.name
    return re.sub(r"[^\w.-]", "_", name)


class WeightedReward:
    """``sum_i weight_i * source_i`` over the sources that scored each sample (NaN = "not
    applicable"); NaN only where every source is NaN (TRL's ``nansum`` rule).

    ``last_components`` holds each source's unweighted scores from the latest call under its
    metric name (``names``; unique, for ``reward/<name>/mean``); a ``context`` is handed to
    the sources that take one.
    """

    def __init__(
        self, sources: Sequence[tuple[RewardSource, float]], names: Sequence[str] | None = None
    ) -> None:
        if not sources:
            raise ConfigError("rewards: give at least one {function: ...} or {model: ...}")
        self.sources = list(sources)
        self.name = " + ".join(f"{w:g}*{s.name}" for s, w in self.sources)
        given = list(names) if names is not None else [s.name for s, _ in self.sources]
        self.names: list[str] = []
        for name in given:  # the same function twice (other options): name_2, name_3, ...
            unique, k = name, 1
            while unique in self.names:
                k += 1
                unique = f"{name}_{k}"
            self.names.append(unique)
        self.last_components: dict[str, Tensor] = {}

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        rows: list[dict[str, Any]],
        *,
        context: RewardContext | None = None,
    ) -> Tensor:
        parts = [
            score_with_context(source, prompts, completions, rows, context).float().cpu()
            for source, _ in self.sources
        ]
        self.last_components = dict(zip(self.names, parts, strict=True))
        stacked = torch.stack(parts)  # [sources, N]
        weights = torch.tensor([w for _, w in self.sources], dtype=stacked.dtype)
        total = (weights[:, None] * stacked).nansum(dim=0)
        return total.masked_fill(stacked.isnan().all(dim=0), math.nan)


_SPEC_KEYS = (
    "function",
    "model",
    "teacher_log_ratio",
    "weight",
    "options",
    "combination",
    "penalty",
)
_SOURCE_KEYS = ("function", "model", "teacher_log_ratio")


def build_reward_source(
    specs: Sequence[Mapping[str, Any] | RewardFn],
    *,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
) -> WeightedReward:
    """The weighted sum of the sources in ``specs`` (see the module docstring).

    Model sources use their own tokenizer (a reward model may have been trained from a
    different base than the policy). ``{teacher_log_ratio: {teacher: <model>, reference:
    <model>}}`` is seed 001's reward log π_t(c|p) - log π_ref(c|p)
    (``rollout.model_rewards.TeacherLogRatioReward``); both models must share ``tokenizer``
    (the policy's; the teacher's own when None). A callable entry is ``{function: it}``.
    """
    sources: list[tuple[RewardSource, float]] = []
    names: list[str] = []
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
        if callable(spec):
            spec = {"function": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"{where}: expected {{function: ...}} or {{model: ...}}, got {spec!r}"
            )
        unknown = [k for k in spec if k not in _SPEC_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}: unknown key '{unknown[0]}' (keys: {', '.join(_SPEC_KEYS)})"
            )
        if sum(key in spec for key in _SOURCE_KEYS) != 1:
            raise ConfigError(
                f"{where}: give exactly one of 'function', 'model' or 'teacher_log_ratio'"
            )
        weight = spec.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight)
        ):
            raise ConfigError(f"{where}: weight must be a finite number, got {weight!r}")
        options = spec.get("options") or {}
        if not isinstance(options, Mapping) or ("function" not in spec and options):
            raise ConfigError(f"{where}: 'options' is a mapping, for a 'function' entry only")
        if "function" in spec:
            function = spec["function"]
            label = function_name(function) if callable(function) else str(function)
            source: RewardSource = FunctionReward(
                resolve_reward_function(function, options), name=label
            )
        elif "model" in spec and (Path(str(spec["model"])).expanduser() / ENSEMBLE_FILE).is_file():
            # an `alignkit train rm-ensemble` run: combined reward minus penalty * std
            source = load_reward_source(
                spec["model"],
                combination=str(spec.get("combination", "mean")),
                penalty=float(spec.get("penalty", 0.0)),
                device=device,
            )
        elif "model" in spec:
            source = ModelReward(spec["model"], device=device)
        else:
            source = teacher_log_ratio_source(spec["teacher_log_ratio"], where, tokenizer, device)
        sources.append((source, float(weight)))
        names.append(metric_name(spec, source))
    return WeightedReward(sources, names)
