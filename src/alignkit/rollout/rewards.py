"""Reward sources: user functions (TRL's signature), trained reward/cost models, weighted sums.

A reward function is called once per batch with keywords::

    fn(prompts: list[str], completions: list[str], **row_fields) -> list[float | None]

``row_fields`` are the prompt file's other columns, one list per column (``answer=[...]``), as
in TRL. ``None`` means "not applicable" and becomes NaN (left out of group statistics). The
output is checked on every call: it must have one entry per completion, each a real number
(``int``, ``float``, a numpy or 0-d torch number) or None; ``bool`` is rejected (a comparison
returned by mistake is a common bug: return ``float(ok)``), as are strings, NaN and infinities
(say "not applicable" with None). Any failure, or an exception inside the function, raises
``RewardFunctionError`` naming the function and showing one offending prompt and completion.

In YAML: ``rewards: [{function: "pkg.mod:fn" | "path/file.py:fn" | "<registered name>",
weight: 1.0, options: {...}}, {model: runs/rm, weight: 0.5}]``. A function entry may name a class
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
``models.reward.score_texts`` (one rendering of ``prompt + completion``).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
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
    describe_sample,
    registered_rewards,
    reward_families,
    shorten,
)

__all__ = [
    "FunctionReward",
    "ModelReward",
    "RewardFunctionError",
    "RewardSource",
    "WeightedReward",
    "build_reward_source",
    "registered_rewards",
    "resolve_reward_function",
]


@runtime_checkable
class RewardSource(Protocol):
    """Scores completions: ``[N] float32`` on CPU, NaN = not applicable."""

    name: str

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Tensor: ...


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


def resolve_reward_function(spec: str, options: Mapping[str, Any] | None = None) -> RewardFn:
    """The callable named by ``module:function``, ``path/file.py:function``, a built-in name or
    ``family:name``; a class is built with ``options`` (see the module docstring)."""
    options = dict(options or {})
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


def _as_number(value: Any) -> float | str | None:
    """The float of one returned value, None for None, or a description of what is wrong."""
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
    if not math.isfinite(number):
        return f"{number}; use None for 'not applicable'"
    return number


def check_reward_output(
    name: str, output: Any, prompts: Sequence[str], completions: Sequence[str]
) -> Tensor:
    """``[N] float32`` from a reward function's output, or ``RewardFunctionError``."""
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
                f"reward function '{name}' returned {number} for sample {i}:"
                f"{describe_sample(prompts, completions, i)}"
            )
        values.append(math.nan if number is None else number)
    return torch.tensor(values, dtype=torch.float32)


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: [row.get(key) for row in rows] for key in keys}


class FunctionReward:
    """A reward function called with TRL's signature; its output checked on every call."""

    def __init__(self, fn: RewardFn, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", repr(fn))

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Tensor:
        try:
            output = self.fn(prompts=prompts, completions=completions, **_columns(rows))
        except AlignkitError:  # already names what is wrong (a built-in verifier's own error)
            raise
        except Exception as err:  # the user's code: one line, no traceback
            raise RewardFunctionError(
                f"reward function '{self.name}' raised {type(err).__name__}: {shorten(err)}; "
                f"called on {len(completions)} completions, the first:"
                f"{describe_sample(prompts, completions, 0)}"
            ) from None
        return check_reward_output(self.name, output, prompts, completions)


class WeightedReward:
    """``sum_i weight_i * source_i``; NaN in any source makes the row NaN (not applicable).

    ``last_components`` holds each source's unweighted scores from the latest call (for
    per-source metrics).
    """

    def __init__(self, sources: Sequence[tuple[RewardSource, float]]) -> None:
        if not sources:
            raise ConfigError("rewards: give at least one {function: ...} or {model: ...}")
        self.sources = list(sources)
        self.name = " + ".join(f"{w:g}*{s.name}" for s, w in self.sources)
        self.last_components: dict[str, Tensor] = {}

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Tensor:
        total = torch.zeros(len(completions), dtype=torch.float32)
        self.last_components = {}
        for source, weight in self.sources:
            scores = source(prompts, completions, rows)
            self.last_components[source.name] = scores
            total = total + weight * scores
        return total


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
    specs: Sequence[Mapping[str, Any]],
    *,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
) -> WeightedReward:
    """The weighted sum of the sources in ``specs`` (see the module docstring).

    Model sources use their own tokenizer (a reward model may have been trained from a
    different base than the policy). ``{teacher_log_ratio: {teacher: <model>, reference:
    <model>}}`` is seed 001's reward log π_t(c|p) - log π_ref(c|p)
    (``rollout.model_rewards.TeacherLogRatioReward``); both models must share ``tokenizer`` (the policy's; the
    teacher's own when None).
    """
    sources: list[tuple[RewardSource, float]] = []
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
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
            source: RewardSource = FunctionReward(
                resolve_reward_function(str(spec["function"]), options),
                name=str(spec["function"]),
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
    return WeightedReward(sources)
