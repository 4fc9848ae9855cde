"""Fixtures for the model tests: an isolated alignkit cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty alignkit cache root, so the user's real cache never leaks into a test."""
    root = tmp_path / "alignkit-cache"
    monkeypatch.setenv("ALIGNKIT_CACHE", str(root))
    return root
