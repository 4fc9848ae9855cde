"""Write rows as JSONL (or one JSON list for ``.json``) atomically: readers never see half a file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.tracking.io import atomic_write_text

__all__ = ["write_rows"]


def write_rows(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` to ``path`` (``.jsonl``/``.ndjson``: one object a line; ``.json``: a list).

    Returns the number of rows written.
    """
    path = Path(path)
    rows = list(rows)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif suffix == ".json":
        text = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    else:
        raise AlignkitError(f"{path}: output must be .jsonl, .ndjson or .json, got {suffix!r}")
    atomic_write_text(path, text)
    return len(rows)
