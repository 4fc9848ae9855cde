"""Writing a config: plain dicts, the resolved config.yaml of a run, commented defaults."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import platform
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import yaml

from alignkit.config.loader import _fields_by_key, _parse_override, _type_name
from alignkit.config.schema import CHANGES_KEY, VERSIONS_KEY, config_key

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
    if type(value).__module__.startswith("datasets."):
        # An in-memory `datasets.Dataset` given as a data file from Python: recorded, not saved.
        return f"<in-memory {type(value).__name__} of {len(value)} rows>"
    if callable(value):  # a reward function given from Python: recorded by name
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"<python {getattr(value, '__module__', '?')}.{name}>"
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


def save_resolved_config(
    cfg: Any, path: str | Path, changes: list[dict[str, Any]] | None = None
) -> Path:
    """Write `cfg` as YAML (loadable by :func:`load_config`) with a `_versions` record, and
    the `_changes` made on resumes when there are any."""
    from alignkit.tracking.io import atomic_write_text  # the tracking package imports torch

    path = Path(path)
    data = config_to_dict(cfg)
    if changes:
        data[CHANGES_KEY] = changes
    data[VERSIONS_KEY] = library_versions()
    text = (
        f"# Resolved {type(cfg).__name__}; `{VERSIONS_KEY}` records who wrote it.\n"
        + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    )
    atomic_write_text(path, text)
    return path


def describe_config(cfg: Any, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, value, help)`` of every field of `cfg` (an instance, e.g. the
    defaults), nested configs expanded, in declaration order."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        key, value = prefix + config_key(f), getattr(cfg, f.name)
        helptext = f.metadata.get("help", "")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            rows.append((key, "a mapping", None, helptext))
            rows.extend(describe_config(value, key + "."))
        else:
            rows.append((key, _type_name(hints[f.name]), _plain(value), helptext))
    return rows


def describe_defaults(
    cls: type, overrides: Sequence[str] = (), prefix: str = ""
) -> list[tuple[str, str, Any, str]]:
    """:func:`describe_config` of ``load_config(cls, None, overrides)`` read from the class
    alone: nothing is constructed, so no ``__post_init__`` runs (those import torch to check
    registered names). A default that a ``__post_init__`` derives from other settings (PPO's
    critic) shows as the field's own default; its help says so."""
    values = dict(_parse_override(cls, text) for text in overrides)
    return _describe_class(cls, prefix, values)


def _describe_class(
    cls: type, prefix: str, values: Mapping[str, Any]
) -> list[tuple[str, str, Any, str]]:
    rows: list[tuple[str, str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, helptext = prefix + config_key(f), f.metadata.get("help", "")
        factory = f.default_factory
        if key in values:
            rows.append((key, _type_name(hints[f.name]), _plain(values[key]), helptext))
        elif isinstance(factory, type) and dataclasses.is_dataclass(factory):
            rows.append((key, "a mapping", None, helptext))
            rows.extend(_describe_class(factory, key + ".", values))
        else:
            value = factory() if factory is not dataclasses.MISSING else f.default
            rows.append((key, _type_name(hints[f.name]), _plain(value), helptext))
    return rows


def config_yaml(cfg: Any) -> str:
    """`cfg` as a commented YAML file (every field, its help as a comment), loadable by
    :func:`load_config`: ``alignkit config <method>`` prints the defaults this way."""
    lines = [f"# {type(cfg).__name__}: every setting with its default; edit and pass with -c."]
    for key, _, value, helptext in describe_config(cfg):
        depth = key.count(".")
        name = key.rsplit(".", 1)[-1]
        comment = f"  # {helptext}" if helptext else ""
        shown = "" if value is None and _is_section(cfg, key) else f" {_yaml_scalar(value)}"
        lines.append(f"{'  ' * depth}{name}:{shown}{comment}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: Any) -> str:
    """One value in YAML flow style (``1.0e-05``, ``[0.9, 0.999]``, ``null``) on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _is_section(cfg: Any, key: str) -> bool:
    value = cfg
    for part in key.split("."):
        field_by_key = _fields_by_key(type(value))[part]
        value = getattr(value, field_by_key.name)
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
