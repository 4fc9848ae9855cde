"""Loading a config: YAML file plus dotted ``key=value`` overrides, checked against the
dataclass' type hints; a wrong key names its nearest valid spelling and where it came from."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, Union

import yaml

from alignkit.config.schema import CHANGES_KEY, VERSIONS_KEY, T, config_key
from alignkit.config.trl_names import trl_hint
from alignkit.errors import ConfigError

# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


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
        raw.pop(CHANGES_KEY, None)
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
    """'unknown key X (did you mean Y?)': a TRL/transformers name or a misspelling of one
    first (`alignkit.config.trl_names`), then siblings, then the whole tree."""
    everything = _all_keys(root)
    trl = trl_hint(bad, everything, root.__name__)
    if trl is not None:
        return f"unknown key '{bad}' for {root.__name__} ({trl})"
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


@dataclasses.dataclass
class _Pending:
    """A config dataclass whose keys and value types are checked, not yet constructed: every
    key and type error of the whole file is found before any ``__post_init__`` runs (those
    consult registries that import torch; a misspelt key must not wait for that)."""

    cls: type
    kwargs: dict[str, Any]
    where: str


def _build(cls: type[T], raw: Any, prefix: str, origin: _Origin, root: type | None = None) -> T:
    return _construct(_check(cls, raw, prefix, origin, root), origin)


def _check(cls: type, raw: Any, prefix: str, origin: _Origin, root: type | None = None) -> _Pending:
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
    return _Pending(cls, kwargs, where)


def _construct(value: Any, origin: _Origin) -> Any:
    """Build the checked tree bottom-up; a ``__post_init__`` error names its section."""
    if isinstance(value, list):
        return [_construct(v, origin) for v in value]
    if isinstance(value, tuple):
        return tuple(_construct(v, origin) for v in value)
    if isinstance(value, dict):
        return {k: _construct(v, origin) for k, v in value.items()}
    if not isinstance(value, _Pending):
        return value
    kwargs = {name: _construct(v, origin) for name, v in value.kwargs.items()}
    try:
        return value.cls(**kwargs)
    except ConfigError as exc:
        where = value.where
        named = str(exc).startswith(f"{where}.")  # the message already gives the full key
        scope = f"in '{where}': " if where and not named else ""
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
        # A list option wraps a single value into a one-item list (`report_to=wandb`); when the
        # union also takes the value as it is (`target_modules: list[str] | str` given
        # `all-linear`), that wrapping must not win over it: try the options of the value's
        # own shape first.
        is_list = isinstance(value, (list, tuple))
        options.sort(key=lambda option: _is_sequence(option) != is_list)
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
        return _check(tp, value, key + ".", origin, root)
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


def _is_sequence(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, Sequence, tuple)


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
