"""The one registry behind every kind selected by name."""

from __future__ import annotations

import pytest

from alignkit.errors import AlignkitError, ConfigError
from alignkit.ops._registry import Registry, UnknownNameError


def _registry() -> Registry[int]:
    registry: Registry[int] = Registry("test kind")
    registry.add("alpha", 1, aliases=("a",))
    registry.register("beta")(2)
    return registry


def test_lookup_by_name_and_alias_in_registration_order():
    registry = _registry()
    assert registry.get("alpha") == registry["a"] == 1 and registry.get("beta") == 2
    assert registry.names() == ("alpha", "beta") and list(registry) == ["alpha", "beta"]
    assert len(registry) == 2 and "a" in registry and "gamma" not in registry
    assert registry.canonical("a") == "alpha" and registry.aliases("alpha") == ("a",)
    assert registry.describe() == "alpha (alias a), beta"


def test_duplicate_names_and_aliases_are_refused():
    registry = _registry()
    with pytest.raises(ValueError, match="test kind name 'beta' is already registered"):
        registry.add("beta", 3)
    with pytest.raises(ValueError, match="test kind name 'a' is already registered"):
        registry.register("gamma", aliases=("a",))(3)
    with pytest.raises(ValueError, match="aliases repeat a name"):
        registry.add("delta", 4, aliases=("delta",))
    assert registry.names() == ("alpha", "beta")


def test_unknown_name_lists_the_valid_ones_with_a_hint():
    registry = _registry()
    with pytest.raises(
        UnknownNameError,
        match=r"unknown test kind 'alpah'; valid: alpha \(alias a\), beta\. "
        r"Did you mean 'alpha'\?",
    ) as caught:
        registry.get("alpah")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, AlignkitError)
    with pytest.raises(UnknownNameError) as caught:
        registry.get("zzzzzz")
    assert "Did you mean" not in str(caught.value)


def test_check_names_the_config_field_and_returns_the_canonical_name():
    registry = _registry()
    assert registry.check("a", "section.kind") == "alpha"
    with pytest.raises(ConfigError, match=r"section\.kind: unknown test kind 'bta'.*'beta'"):
        registry.check("bta", "section.kind")


def test_unregister_removes_the_name_and_its_aliases():
    registry = _registry()
    registry.unregister("a")
    assert "alpha" not in registry and "a" not in registry and registry.names() == ("beta",)
    registry.add("alpha", 5, aliases=("a",))  # free again
    assert registry["a"] == 5
