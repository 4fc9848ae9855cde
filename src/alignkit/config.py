"""Config dataclasses and their loader: YAML file plus dotted ``key=value`` overrides.

Every trainer has one config dataclass built from typed sub-configs (``optim``, ``eval``,
``logging``, ``checkpoint``, ...). :func:`load_config` reads a YAML file, applies command-line
overrides such as ``optim.lr=3e-5`` (values parsed as YAML, so numbers, booleans and lists
work), and checks every key and value against the dataclass' type hints. A wrong key is an
error that names the key, its nearest valid spelling and where it came from (file or
override); so is a value of the wrong type.

A field whose name is a Python keyword plus ``_`` (``lambda_``) is written without the
underscore in YAML (``lambda:``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import keyword
import math
import platform
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

from alignkit.errors import ConfigError
from alignkit.tracking.io import atomic_write_text, umask_mode

__all__ = [
    "CheckpointConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "LoggingConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "atomic_write_text",
    "config_to_dict",
    "library_versions",
    "load_config",
    "save_resolved_config",
    "umask_mode",
]

T = TypeVar("T")

#: Top-level key of a written config that records library versions; ignored when loading.
VERSIONS_KEY = "_versions"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# --------------------------------------------------------------------------------------
# Shared sub-configs of every offline trainer
# --------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """AdamW, its learning-rate schedule and gradient clipping."""

    lr: float = field(default=1e-5, metadata=_help("Peak learning rate of AdamW."))
    betas: tuple[float, float] = field(
        default=(0.9, 0.999), metadata=_help("AdamW (beta1, beta2).")
    )
    eps: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    weight_decay: float = field(
        default=0.0,
        metadata=_help(
            "Decoupled weight decay; applied to matrices only, never to biases or norms."
        ),
    )
    schedule: Literal["constant", "linear", "cosine"] = field(
        default="linear",
        metadata=_help("Learning-rate decay after warm-up: constant, linear to 0, or cosine to 0."),
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata=_help("Fraction of the optimizer steps spent warming up linearly from 0."),
    )
    warmup_steps: int | None = field(
        default=None, metadata=_help("Warm-up length in optimizer steps; overrides warmup_ratio.")
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata=_help("Clip the global gradient norm to this value; null: no clip.")
    )
    max_consecutive_skipped_steps: int = field(
        default=10,
        metadata=_help(
            "A step whose gradient norm is inf/NaN is skipped; stop the run after more than "
            "this many skipped steps in a row."
        ),
    )

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr must be > 0")
        _require(all(0 <= b < 1 for b in self.betas), "betas must lie in [0, 1)")
        _require(self.eps > 0, "eps must be > 0")
        _require(self.weight_decay >= 0, "weight_decay must be >= 0")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio must lie in [0, 1)")
        _require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0")
        _require(
            self.max_consecutive_skipped_steps >= 0, "max_consecutive_skipped_steps must be >= 0"
        )


@dataclass
class EarlyStoppingConfig:
    """Stop when an evaluation metric has not improved for `patience` evaluations."""

    metric: str | None = field(
        default=None, metadata=_help("Evaluation metric to watch, e.g. eval/loss; null: off.")
    )
    mode: Literal["min", "max"] = field(
        default="min", metadata=_help("Whether a lower (min) or higher (max) value is better.")
    )
    patience: int = field(
        default=3, metadata=_help("Evaluations without improvement before training stops.")
    )
    min_delta: float = field(
        default=0.0, metadata=_help("Smallest change that counts as an improvement.")
    )

    def __post_init__(self) -> None:
        _require(self.patience >= 1, "patience must be >= 1")
        _require(self.min_delta >= 0, "min_delta must be >= 0")


@dataclass
class EvalConfig:
    """When and how to evaluate."""

    every: int | None = field(
        default=None,
        metadata=_help("Evaluate every N optimizer steps (and at the end); null: at the end only."),
    )
    examples_per_device: int = field(
        default=8, metadata=_help("Evaluation examples per device per forward pass.")
    )
    early_stopping: EarlyStoppingConfig = field(
        default_factory=EarlyStoppingConfig, metadata=_help("Early stopping on an eval metric.")
    )

    def __post_init__(self) -> None:
        _require(self.every is None or self.every >= 1, "every must be >= 1")
        _require(self.examples_per_device >= 1, "examples_per_device must be >= 1")


@dataclass
class LoggingConfig:
    """Where metrics go and how often."""

    every: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = field(
        default_factory=lambda: ["jsonl"],
        metadata=_help(
            "Metric sinks; metrics.jsonl is always written. tensorboard and wandb need their "
            "packages installed. A single name is accepted as a one-item list."
        ),
    )
    progress_bar: bool = field(
        default=True, metadata=_help("Show a progress bar with ETA and key metrics.")
    )
    console_format: str | None = field(
        default=None,
        metadata=_help(
            "Line printed at each logging step, a str.format template over metric names plus "
            "step, total_steps, epoch (fractional) and epoch_number (1-based), e.g. "
            "'Epoch {epoch_number} step {step} loss={loss:.4f}'. null: the trainer's default; "
            "'': none."
        ),
    )
    wandb_project: str = field(default="alignkit", metadata=_help("W&B project name."))
    plots: bool = field(
        default=True, metadata=_help("Write PNG curves into plots/ at the end of training.")
    )

    def __post_init__(self) -> None:
        _require(self.every >= 1, "every must be >= 1")


@dataclass
class CheckpointConfig:
    """Atomic checkpoints in <run>/checkpoints/step-N/."""

    every: int | None = field(
        default=None,
        metadata=_help("Save every N optimizer steps (and at the end); null: at the end only."),
    )
    keep_last: int | None = field(
        default=2, metadata=_help("Keep the newest K checkpoints; null: keep all.")
    )

    def __post_init__(self) -> None:
        _require(self.every is None or self.every >= 1, "every must be >= 1")
        _require(self.keep_last is None or self.keep_last >= 1, "keep_last must be >= 1")


@dataclass
class RunConfig:
    """Settings of every run, whatever its schedule: where it writes, seed, precision,
    optimizer, evaluation, logging and checkpoints (:class:`alignkit.trainers.run.RunLoop`).

    A schedule's config adds its own batch words: :class:`TrainConfig` the offline ones
    (epochs, examples per device, accumulation); an online config prompts and sequences.
    """

    run_name: str = field(default="run", metadata=_help("Run directory name under output_dir."))
    output_dir: str = field(default="runs", metadata=_help("Parent folder of run directories."))
    resume_from: str | None = field(
        default=None,
        metadata=_help(
            "Run directory to continue from its newest complete checkpoint (writes there)."
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_help("Start afresh in an existing run directory, deleting its old results."),
    )
    seed: int = field(default=0, metadata=_help("Seed of Python, NumPy, torch and data order."))
    precision: Literal["fp32", "bf16"] = field(
        default="fp32", metadata=_help("fp32, or bf16 autocast (weights stay in their dtype).")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Recompute activations in backward to save memory.")
    )
    dataloader_workers: int = field(
        default=0, metadata=_help("Worker processes that collate batches; 0: in the main one.")
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=_help("Optimizer."))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_help("Evaluation."))
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=_help("Logging."))
    checkpoint: CheckpointConfig = field(
        default_factory=CheckpointConfig, metadata=_help("Checkpoints.")
    )

    def __post_init__(self) -> None:
        _require(self.dataloader_workers >= 0, "dataloader_workers must be >= 0")
        _require(bool(self.run_name.strip()), "run_name must not be empty")

    @property
    def run_dir(self) -> Path:
        """Where this run writes: `resume_from` when resuming, else output_dir/run_name."""
        if self.resume_from:
            return Path(self.resume_from)
        return Path(self.output_dir) / self.run_name


@dataclass
class TrainConfig(RunConfig):
    """Settings of the offline loop (epochs over a dataset); every offline trainer's config
    inherits them."""

    epochs: int = field(default=1, metadata=_help("Passes over the training data."))
    max_steps: int | None = field(
        default=None, metadata=_help("Stop after this many optimizer steps; overrides epochs.")
    )
    examples_per_device: int = field(
        default=8, metadata=_help("Training examples (rows) per device per forward pass.")
    )
    grad_accum_steps: int = field(
        default=1, metadata=_help("Forward passes whose gradients make one optimizer step.")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.epochs >= 1, "epochs must be >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        _require(self.examples_per_device >= 1, "examples_per_device must be >= 1")
        _require(self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def config_key(f: dataclasses.Field) -> str:
    """The YAML key of a dataclass field (`lambda_` is written `lambda`)."""
    name = f.name
    if name.endswith("_") and keyword.iskeyword(name[:-1]):
        return name[:-1]
    return name


class _Origin:
    """Where a value came from, for error messages: the file, or the override that set it."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.overrides: dict[str, str] = {}

    def describe(self, dotted: str) -> str:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            text = self.overrides.get(".".join(parts[:i]))
            if text is not None:
                return f"override '{text}'"
        return self.file or "defaults"

    def describe_scope(self, scope: str) -> str:
        """Source of a whole sub-config: the file and every override inside it."""
        inside = [
            text
            for key, text in self.overrides.items()
            if not scope or key == scope or key.startswith(scope + ".")
        ]
        if not inside:
            return self.describe(scope)
        shown = ", ".join(f"'{t}'" for t in inside)
        label = "override" if len(inside) == 1 else "overrides"
        return f"{self.file} with {label} {shown}" if self.file else f"{label} {shown}"

    def error(self, dotted: str, message: str, *, scope: bool = False) -> ConfigError:
        where = self.describe_scope(dotted) if scope else self.describe(dotted)
        return ConfigError(f"config error in {where}: {message}")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (or its defaults when `path` is None) plus overrides.

    >>> cfg = load_config(TrainConfig, None, ["optim.lr=3e-5", "logging.every=5"])
    >>> (cfg.optim.lr, cfg.logging.every)
    (3e-05, 5)
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    raw: dict[str, Any] = {}
    origin = _Origin(str(path) if path is not None else None)
    if path is not None:
        raw = _read_yaml(Path(path))
        raw.pop(VERSIONS_KEY, None)
    for text in overrides:
        dotted, value = _parse_override(cls, text)
        origin.overrides[dotted] = text
        _set_dotted(raw, dotted.split("."), value)
    return _build(cls, raw, "", origin)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error in {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config error in {path}: the top level must map keys to values, "
            f"got {type(data).__name__}"
        )
    return data


def _parse_override(cls: type, text: str) -> tuple[str, Any]:
    dotted, sep, raw_value = text.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. optim.lr=3e-5")
    field_type = _type_at(cls, dotted, text)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    # `run_name=2024` means the string "2024": keep the text for string fields.
    if value is not None and not isinstance(value, str) and _accepts_str(field_type):
        value = raw_value
    return dotted, value


def _type_at(cls: type, dotted: str, text: str) -> Any:
    """The declared type at `dotted` in `cls`; unknown keys raise with a suggestion."""
    current: Any = cls
    walked: list[str] = []
    for part in dotted.split("."):
        current = _strip_optional(current)
        if dataclasses.is_dataclass(current):
            fields = _fields_by_key(current)
            if part not in fields:
                bad = ".".join([*walked, part])
                raise ConfigError(
                    f"config error in override '{text}': {_unknown_key_message(cls, bad, walked)}"
                )
            current = typing.get_type_hints(current)[fields[part].name]
        elif typing.get_origin(current) in (dict, Mapping):
            current = typing.get_args(current)[1] if typing.get_args(current) else Any
        elif current is Any:
            pass
        else:
            raise ConfigError(
                f"config error in override '{text}': '{'.'.join(walked)}' holds "
                f"{_type_name(current)}, it has no key '{part}'"
            )
        walked.append(part)
    return current


def _set_dotted(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _deep_merge(node[last], value)
    else:
        node[last] = value


def _deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _fields_by_key(cls: type) -> dict[str, dataclasses.Field]:
    return {config_key(f): f for f in dataclasses.fields(cls) if f.init}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for key, f in _fields_by_key(cls).items():
        dotted = prefix + key
        keys.append(dotted)
        sub = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(sub):
            keys.extend(_all_keys(sub, dotted + "."))
    return keys


def _unknown_key_message(root: type, bad: str, parent: list[str]) -> str:
    """'unknown key X (did you mean Y?)', looking at siblings first, then the whole tree."""
    everything = _all_keys(root)
    prefix = ".".join(parent) + "." if parent else ""
    siblings = [k for k in everything if k.startswith(prefix) and "." not in k[len(prefix) :]]
    guess = difflib.get_close_matches(bad, siblings, n=1, cutoff=0.6)
    if not guess:
        leaf = bad.rsplit(".", 1)[-1]
        guess = [k for k in everything if k.rsplit(".", 1)[-1] == leaf]
    if not guess:
        guess = difflib.get_close_matches(bad, everything, n=1, cutoff=0.75)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return f"unknown key '{bad}' for {root.__name__}{hint}"


def _build(cls: type[T], raw: Any, prefix: str, origin: _Origin, root: type | None = None) -> T:
    root = root or cls
    where = prefix.rstrip(".")
    if not isinstance(raw, Mapping):
        raise origin.error(
            where, f"'{where}' must be a mapping of keys to values, got {_show(raw)}"
        )
    fields = _fields_by_key(cls)
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            dotted = prefix + str(key)
            parent = where.split(".") if where else []
            raise origin.error(dotted, _unknown_key_message(root, dotted, parent))
    kwargs = {}
    for key, f in fields.items():
        dotted = prefix + key
        if key in raw:
            kwargs[f.name] = _coerce(raw[key], hints[f.name], dotted, origin, root)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise origin.error(dotted, f"missing required key '{dotted}'")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        scope = f"in '{where}': " if where else ""
        raise origin.error(where, f"{scope}{exc}", scope=True) from None


def _coerce(value: Any, tp: Any, key: str, origin: _Origin, root: type) -> Any:
    """Check `value` against the type hint `tp`, converting where YAML is lossy."""
    if tp is Any or tp is object:
        return value
    kind = typing.get_origin(tp)
    args = typing.get_args(tp)
    if kind is Union or kind is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key, origin, root)
            except ConfigError as exc:
                errors.append(exc)
        if len(options) == 1 and _is_structured(options[0]):
            raise errors[0]  # the error inside the mapping or list says more
        raise origin.error(key, f"'{key}' must be {_type_name(tp)}, got {_show(value)}")
    if value is None:
        raise origin.error(key, f"'{key}' must be {_type_name(tp)}, got null")
    if kind is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        guess = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        choices = ", ".join(repr(a) for a in args)
        raise origin.error(key, f"'{key}' must be one of {choices}, got {_show(value)}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key + ".", origin, root)
    if kind in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            value = [value]  # `report_to=wandb` means [wandb]
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]", origin, root) for i, v in enumerate(value)]
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise origin.error(key, f"'{key}' must be a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        else:
            items = list(args)
            if len(items) != len(value):
                raise origin.error(
                    key, f"'{key}' must have {len(items)} items, got {len(value)}: {_show(value)}"
                )
        return tuple(
            _coerce(v, t, f"{key}[{i}]", origin, root)
            for i, (v, t) in enumerate(zip(value, items, strict=True))
        )
    if kind in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise origin.error(key, f"'{key}' must be a mapping, got {_show(value)}")
        value_type = args[1] if args else Any
        return {
            str(k): _coerce(v, value_type, f"{key}.{k}", origin, root) for k, v in value.items()
        }
    return _coerce_scalar(value, tp, key, origin)


def _coerce_scalar(value: Any, tp: Any, key: str, origin: _Origin) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    elif isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    hint = " (quote it to make it a string)" if tp is str else ""
    raise origin.error(key, f"'{key}' must be {_type_name(tp)}, got {_show(value)}{hint}")


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _is_structured(tp: Any) -> bool:
    kind = typing.get_origin(tp)
    return dataclasses.is_dataclass(tp) or kind in (list, Sequence, tuple, dict, Mapping)


def _accepts_str(tp: Any) -> bool:
    tp = _strip_optional(tp)
    return tp is str or (isinstance(tp, type) and issubclass(tp, PurePath))


def _type_name(tp: Any) -> str:
    kind = typing.get_origin(tp)
    if kind in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if kind is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if kind in (list, Sequence, tuple):
        return "a list"
    if kind in (dict, Mapping) or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (YAML keys, paths as strings, tuples as lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {config_key(f): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return value  # YAML writes .inf / .nan and reads them back
    return value


def library_versions() -> dict[str, str]:
    """Versions of alignkit and the libraries that decide its numbers."""
    from alignkit import __version__

    versions = {"alignkit": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "peft"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def save_resolved_config(cfg: Any, path: str | Path) -> Path:
    """Write `cfg` as YAML (loadable by :func:`load_config`) with a `_versions` record."""
    path = Path(path)
    data = config_to_dict(cfg)
    data[VERSIONS_KEY] = library_versions()
    text = (
        f"# Resolved {type(cfg).__name__}; `{VERSIONS_KEY}` records who wrote it.\n"
        + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    )
    atomic_write_text(path, text)
    return path
