"""Online RL from Python: ``alignkit.train_grpo`` and the other presets.

What a notebook user holds goes in as Python objects, the rest as a config (an object, a YAML
file, or the method's defaults) plus ``key=value`` overrides; the run summary comes back::

    import alignkit

    def accuracy(prompts, completions, answer, **kwargs):   # TRL's reward contract
        return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]

    summary = alignkit.train_grpo(
        "examples/grpo.yaml",                        # or a PGConfig, or None: the defaults
        model="smollm2-135m-instruct",               # a name, a directory, or a loaded model
        reward_funcs=accuracy,                       # callables, names, {model: runs/rm}, ...
        train_dataset=dataset,                       # a datasets.Dataset, rows, or a file
        overrides={"train.iterations": 20, "rollout.samples_per_prompt": 8},
    )

which reads like TRL's ``GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
.train()``. ``train_ppo``, ``train_rloo``, ``train_reinforce_pp``, ``train_reinforce`` and
``train_safe_ppo`` (with ``cost_funcs``) take the same arguments; ``train_online(method, ...)``
is what they call. Each method's defaults (``advantage.estimator=gae`` for PPO, ...) apply to
its config as on the command line: a config object that sets one of them otherwise is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import config_to_dict, load_config
from alignkit.errors import ConfigError
from alignkit.trainers.registry import get_method

__all__ = [
    "train_grpo",
    "train_online",
    "train_ppo",
    "train_reinforce",
    "train_reinforce_pp",
    "train_rloo",
    "train_safe_ppo",
]

#: The online methods and their Python names.
PRESETS = {
    "grpo": "train_grpo",
    "ppo": "train_ppo",
    "rloo": "train_rloo",
    "reinforce++": "train_reinforce_pp",
    "reinforce": "train_reinforce",
    "safe-ppo": "train_safe_ppo",
}


def _override_texts(overrides: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """``key=value`` texts; a mapping's values written as YAML flow values."""
    if isinstance(overrides, Mapping):
        return [f"{key}={_flow(value)}" for key, value in overrides.items()]
    return list(overrides)


def _flow(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**9)
        .strip()
        .removesuffix("...")
        .strip()
    )


def _config(method: str, config: Any, overrides: Sequence[str] | Mapping[str, Any]) -> Any:
    """The run's config: a YAML file or the defaults with the method's defaults and the
    overrides applied, or a config object checked against the method's defaults."""
    chosen = get_method(method)
    config_class = chosen.load_config_class()
    texts = _override_texts(overrides)
    if config is None or isinstance(config, (str, Path)):
        return load_config(config_class, config, [*chosen.defaults, *texts])
    if not isinstance(config, config_class):
        raise ConfigError(
            f"train_{method}: config is a {type(config).__name__}; give a "
            f"{config_class.__name__}, a YAML file or None"
        )
    if texts:
        raise ConfigError(
            f"train_{method}: overrides apply to a YAML file or the defaults; set them on the "
            "config object (dataclasses.replace) instead"
        )
    wanted = config_to_dict(load_config(config_class, None, list(chosen.defaults)))
    given = config_to_dict(config)
    for default in chosen.defaults:
        dotted = default.partition("=")[0]
        here, there = given, wanted
        for part in dotted.split("."):
            here, there = here[part], there[part]
        if here != there:
            raise ConfigError(
                f"train_{method}: the config sets {dotted}={here!r}, but {method} means "
                f"{default}; use the function of that method, or change the config"
            )
    return config


def _sources(funcs: Any, what: str) -> list[Any]:
    """``rewards:`` entries from a callable, a name, a ``{model: ...}`` mapping, or a list."""
    from alignkit.trainers.rl_config import RewardSourceConfig

    items = [funcs] if callable(funcs) or isinstance(funcs, (str, Mapping)) else list(funcs)
    entries = []
    for i, item in enumerate(items):
        if isinstance(item, RewardSourceConfig):
            entries.append(item)
        elif isinstance(item, Mapping):
            try:
                entries.append(RewardSourceConfig(**item))
            except TypeError as err:  # an unknown key
                raise ConfigError(f"{what}[{i}]: {err}") from None
        elif callable(item) or isinstance(item, str):
            entries.append(RewardSourceConfig(function=item))
        else:
            raise ConfigError(f"{what}[{i}]: a callable, a name or a mapping, got {item!r}")
    return entries


def _loaded_model(cfg: Any, model: Any, tokenizer: Any) -> tuple[dict[str, Any], str | None]:
    """``build_pg_trainer``'s ``model``/``tokenizer`` for a model object, and the name the run
    records for the model (None: the config's)."""
    if model is None or isinstance(model, (str, Path)):
        if tokenizer is not None:
            raise ConfigError("tokenizer= goes with a model object; a named model brings its own")
        return {}, None if model is None else str(model)
    if cfg.model.lora is not None:
        raise ConfigError(
            "model.lora applies to a model alignkit loads by name; give the name or path, or a "
            "model with its adapter attached already (peft.get_peft_model)"
        )
    from alignkit.models import ensure_pad_token, load_tokenizer

    name = getattr(model, "name_or_path", "") or ""
    if tokenizer is None:
        if not name:
            raise ConfigError("a model object without name_or_path needs tokenizer=")
        tokenizer = load_tokenizer(name)
    ensure_pad_token(tokenizer, model)
    model.train()
    return {"model": model, "tokenizer": tokenizer}, name or f"<in-memory {type(model).__name__}>"


def train_online(
    method: str,
    config: Any = None,
    *,
    model: Any = None,
    reward_funcs: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    tokenizer: Any = None,
    cost_funcs: Any = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Train with an online method (grpo, ppo, rloo, reinforce++, reinforce, safe-ppo).

    Args:
        config: the method's config object, a YAML file, or None (its defaults).
        model: a model name or directory (``model.name``), or a loaded causal LM to train
            (then ``tokenizer``, unless its ``name_or_path`` loads one).
        reward_funcs: reward sources replacing ``rewards``: a callable (TRL's contract,
            ``rollout.rewards``), a name (``"sort_match"``, ``"my_reward.py:fn"``), a mapping
            (``{"model": "runs/rm", "weight": 0.5}``) or a list of them.
        train_dataset / eval_dataset: prompt rows (``{"prompt": text | messages, ...}``) as a
            ``datasets.Dataset``, a list of rows or a file (``data.train_file`` /
            ``data.eval_file``).
        cost_funcs: Safe-PPO's cost sources (``costs``), as ``reward_funcs``.
        overrides: ``key=value`` texts or a ``{key: value}`` mapping, as on the command line.

    Returns:
        the run summary (``run_dir``, ``last_checkpoint``, ``metrics``, ``eval``, ...).
    """
    if method not in PRESETS:
        raise ConfigError(f"unknown online method {method!r}; valid: {', '.join(PRESETS)}")
    if cost_funcs is not None and method != "safe-ppo":
        raise ConfigError(f"cost_funcs is for train_safe_ppo, not train_{method}")
    data = {
        key: _dataset(rows, name)
        for key, name, rows in (
            ("train_file", "train_dataset", train_dataset),
            ("eval_file", "eval_dataset", eval_dataset),
        )
        if rows is not None
    }
    texts = _override_texts(overrides)
    if config is None or isinstance(config, (str, Path)):
        # stand-ins, so that the file's checks see the data files the objects will be
        texts = [f"data.{key}=<{key}>" for key in data] + texts
    cfg = _config(method, config, texts)
    changes: dict[str, Any] = {}
    if reward_funcs is not None:
        changes["rewards"] = _sources(reward_funcs, "reward_funcs")
    if cost_funcs is not None:
        changes["costs"] = _sources(cost_funcs, "cost_funcs")
    if data:
        changes["data"] = dataclasses.replace(cfg.data, **data)
    loaded, name = _loaded_model(cfg, model, tokenizer)
    if name is not None:
        changes["model"] = dataclasses.replace(cfg.model, name=name)
    # Built again from the changed values, so every check of the config sees them (and the
    # caller's config object is left as it was).
    cfg = dataclasses.replace(cfg, **changes)
    if method == "safe-ppo":
        from alignkit.trainers.safe_ppo import build_safe_ppo_trainer

        return build_safe_ppo_trainer(cfg, **loaded).train()
    from alignkit.trainers.pg import build_pg_trainer

    return build_pg_trainer(cfg, **loaded).train()


def _dataset(rows: Any, name: str) -> Any:
    """A prompt file, a ``datasets.Dataset``, or a list of rows made into one."""
    if isinstance(rows, (str, Path)) or type(rows).__module__.startswith("datasets."):
        return str(rows) if isinstance(rows, Path) else rows
    if not isinstance(rows, Sequence) or not all(isinstance(r, Mapping) for r in rows):
        raise ConfigError(f"{name}: a datasets.Dataset, a list of row mappings or a file")
    import datasets

    try:
        return datasets.Dataset.from_list([dict(r) for r in rows])
    except (TypeError, ValueError) as err:  # pyarrow's errors derive from these
        raise ConfigError(
            f"{name}: the rows do not make one table ({err}); give every row the same columns "
            "of the same types, or pass a datasets.Dataset or a file"
        ) from None


def _preset(method: str) -> Callable[..., dict[str, Any]]:
    @functools.wraps(train_online)
    def train(config: Any = None, **objects: Any) -> dict[str, Any]:
        return train_online(method, config, **objects)

    train.__name__ = train.__qualname__ = PRESETS[method]
    train.__doc__ = (
        f"``train_online({method!r}, ...)``: train with {method}.\n\n"
        + (train_online.__doc__ or "").split("\n\n", 1)[1]
    )
    signature = inspect.signature(train_online)
    shown = [
        p
        for name, p in list(signature.parameters.items())[1:]
        if name != "cost_funcs" or method == "safe-ppo"
    ]
    train.__signature__ = signature.replace(parameters=shown)  # type: ignore[attr-defined]
    return train


train_grpo = _preset("grpo")
train_ppo = _preset("ppo")
train_rloo = _preset("rloo")
train_reinforce_pp = _preset("reinforce++")
train_reinforce = _preset("reinforce")
train_safe_ppo = _preset("safe-ppo")
