"""Run files follow the user's umask, as files made with open/mkdir would (tempfile's
private 0600/0700 is an implementation detail of writing atomically)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from alignkit.config import atomic_write_text
from alignkit.tracking import save_checkpoint


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_and_checkpoints_follow_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert mode(tmp_path / "config.yaml") == 0o666 & ~umask
    checkpoint = save_checkpoint(tmp_path / "run", 1, {"model": torch.nn.Linear(2, 1)}, None, {})
    assert mode(checkpoint) == 0o777 & ~umask
    assert mode(checkpoint / "model") == 0o777 & ~umask
