"""Atomic text files and plain (JSON-ready) values; the bottom of the package (no alignkit
imports), so config, tracking and the CLI share one implementation."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def umask_mode(mode: int) -> int:
    """`mode` as the process umask leaves it: what ``open``/``mkdir`` would give a new file
    (0o666) or directory (0o777). For files made by `tempfile`, which always uses 0600/0700."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so readers see the old or the new content, never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode(0o666))  # mkstemp's 0600 would ignore the user's umask
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_jsonable(value: Any) -> Any:
    """Tensors and NumPy scalars as Python numbers, recursively, so `json` can write them."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
