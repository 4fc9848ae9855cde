"""The optional packages behind some verifiers, checked when a source is built."""

from __future__ import annotations

import importlib.util

from alignkit.errors import ConfigError


def require_package(module: str, package: str, source: str) -> None:
    """A ``ConfigError`` naming the reward source and the install command when ``module`` is
    missing (``pip install 'alignkit[verifiers]'`` brings the pinned versions)."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"reward function '{source}' needs the package {package}: "
            f"pip install 'alignkit[verifiers]' (or pip install {package})"
        )
