"""Fixtures of the peer-library tests (the helpers are in peers.py)."""

from __future__ import annotations

import types

import pytest
from peers import load_verl


@pytest.fixture(scope="session")
def trl() -> types.ModuleType:
    return pytest.importorskip("trl", reason="TRL 1.16 (the bench extra) is not installed")


@pytest.fixture(scope="session")
def verl() -> types.ModuleType:
    """verl 0.9.1's ``core_algos`` module (peers.load_verl)."""
    return load_verl()
