"""Config dataclasses and their loader: YAML file plus dotted ``key=value`` overrides.

Every trainer has one config dataclass built from typed sub-configs (``optim``, ``eval``,
``logging``, ``checkpoint``, ...): `alignkit.config.schema`. :func:`load_config`
(`alignkit.config.loader`) reads a YAML file, applies command-line overrides such as
``optim.lr=3e-5`` (values parsed as YAML, so numbers, booleans and lists work), and checks every
key and value against the dataclass' type hints. A wrong key is an error that names the key, its
nearest valid spelling and where it came from (file or override); so is a value of the wrong
type. `alignkit.config.writer` turns configs back into YAML.

A field whose name is a Python keyword plus ``_`` (``lambda_``) is written without the
underscore in YAML (``lambda:``).
"""

from alignkit.config.loader import load_config
from alignkit.config.schema import (
    CHANGES_KEY,
    VERSIONS_KEY,
    CheckpointConfig,
    EarlyStoppingConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_key,
)
from alignkit.config.writer import (
    config_to_dict,
    config_yaml,
    describe_config,
    describe_defaults,
    library_versions,
    save_resolved_config,
)

# The file helpers live in alignkit.tracking.io; imported on first use, because importing the
# tracking package imports torch, and the CLI must answer --help and config errors without it.
_FROM_TRACKING_IO = ("atomic_write_text", "umask_mode")


def __getattr__(name: str) -> object:
    if name in _FROM_TRACKING_IO:
        from alignkit.tracking import io

        return getattr(io, name)
    raise AttributeError(f"module 'alignkit.config' has no attribute {name!r}")


__all__ = [
    "CHANGES_KEY",
    "VERSIONS_KEY",
    "CheckpointConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "LoggingConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "atomic_write_text",
    "config_key",
    "config_to_dict",
    "config_yaml",
    "describe_config",
    "describe_defaults",
    "library_versions",
    "load_config",
    "save_resolved_config",
    "umask_mode",
]
