"""One registry for every "kind selected by name": KL estimators, advantage estimators, DPO
losses, reward-model losses, policy losses.

A kind is added by decorating one function (``@REGISTRY.register("name")``); a config field
that selects a kind is a plain string checked against the registry (``REGISTRY.check(value,
field)``), so no ``Literal`` or ``if`` chain has to be edited when a kind is added.

Lookups of an unknown name raise :class:`UnknownNameError` listing the valid names and, when
one is close, ``Did you mean ...``. It is both an ``AlignkitError`` (the CLI prints it in one
line and exits 2) and a ``ValueError`` (what the library's functions raise for a bad argument).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from alignkit.errors import AlignkitError, ConfigError

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(AlignkitError, ValueError):
    """A name that no registry entry (nor alias) has."""


class Registry(Generic[T]):
    """Names (and aliases) mapped to registered objects, in registration order.

    Reads like a mapping of the canonical names: ``name in registry`` (aliases count too),
    ``registry[name]`` = ``registry.get(name)`` (an alias resolves to its canonical entry;
    an unknown name raises, there is no default), iteration and ``len`` over canonical names.

    Args:
        what: what an entry is, for messages ("KL estimator", "DPO loss", ...).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    # ----------------------------------------------------------------- registration

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator: register the decorated object as ``name`` (and ``aliases``)."""

        def decorator(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return decorator

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        """Register ``obj`` as ``name``; ``ValueError`` if the name or an alias is taken."""
        for key in (name, *aliases):
            if key in self:
                raise ValueError(f"{self.what} name {key!r} is already registered")
        if len({name, *aliases}) != 1 + len(aliases):
            raise ValueError(f"{self.what} {name!r}: aliases repeat a name: {aliases}")
        self._entries[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its aliases (for tests and plugins that clean up after themselves)."""
        canonical = self.canonical(name)
        del self._entries[canonical]
        for alias in self.aliases(canonical):
            del self._aliases[alias]

    # ----------------------------------------------------------------- lookup

    def canonical(self, name: str) -> str:
        """The canonical name of ``name`` (itself, or what the alias points to)."""
        canonical = self._aliases.get(name, name)
        if canonical not in self._entries:
            raise UnknownNameError(self._unknown_message(name))
        return canonical

    def get(self, name: str) -> T:
        """The entry registered as ``name`` or an alias; :class:`UnknownNameError` otherwise."""
        return self._entries[self.canonical(name)]

    def names(self) -> tuple[str, ...]:
        """Canonical names, in registration order."""
        return tuple(self._entries)

    def aliases(self, name: str) -> tuple[str, ...]:
        """The aliases of the canonical ``name``."""
        return tuple(alias for alias, target in self._aliases.items() if target == name)

    def describe(self) -> str:
        """``"k1 (alias kl), abs, ..."``: the valid names for a message."""
        return ", ".join(
            name + (f" (alias {', '.join(aliases)})" if (aliases := self.aliases(name)) else "")
            for name in self._entries
        )

    def check(self, name: str, field: str) -> str:
        """Validate a config field's value; ``ConfigError`` naming the field otherwise.

        Returns the canonical name.
        """
        try:
            return self.canonical(name)
        except UnknownNameError as err:
            raise ConfigError(f"{field}: {err}") from None

    def _unknown_message(self, name: object) -> str:
        message = f"unknown {self.what} {name!r}; valid: {self.describe()}"
        nearest = difflib.get_close_matches(str(name), [*self._entries, *self._aliases], n=1)
        if nearest:
            message += f". Did you mean {nearest[0]!r}?"
        return message

    # ----------------------------------------------------------------- mapping protocol

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {self.describe()})"
