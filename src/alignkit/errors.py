"""Errors a user can cause. The CLI prints them in one or two lines and exits with code 2.

Every error names where the problem is (file, 1-based row, field) when that is known, so the
user can fix the input without reading a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class AlignkitError(Exception):
    """Base class for every error caused by user input (data, config, model, paths)."""

    exit_code = 2


class ConfigError(AlignkitError):
    """A config key, value or override is wrong."""


class ModelError(AlignkitError):
    """A model cannot be loaded or used as asked (missing files, no pad token, too short)."""


class CheckpointError(AlignkitError):
    """A run directory or checkpoint is missing, incomplete or incompatible."""


class TrainingDivergedError(AlignkitError):
    """Training cannot go on: too many optimizer steps in a row had a non-finite gradient."""


FILE_ROW = 0  # the row number of a problem with the whole file


@dataclass(frozen=True)
class RowProblem:
    """One bad field of one row in a data file."""

    file: str
    row: int  # 1-based line (JSONL/CSV) or record number (JSON, Parquet, datasets); FILE_ROW
    field: str
    message: str

    @property
    def whole_file(self) -> bool:
        """A problem with the file itself (missing, unreadable, empty), not with one row."""
        return self.row == FILE_ROW

    def __str__(self) -> str:
        if self.whole_file:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.row}: field '{self.field}': {self.message}"


class DataError(AlignkitError):
    """One or more rows of a data file are invalid. All problems found (up to a limit) are listed."""

    def __init__(self, problems: Sequence[RowProblem], total: int | None = None, note: str = ""):
        self.problems = list(problems)
        self.total = total if total is not None else len(self.problems)
        lines = [str(p) for p in self.problems]
        more = self.total - len(self.problems)
        if more > 0:
            lines.append(f"... and {more} more problem(s)")
        if self.total == 1 and self.problems[0].whole_file:
            super().__init__(lines[0] + (f" ({note})" if note else ""))
            return
        header = f"{self.total} invalid row(s)" + (f" ({note})" if note else "")
        super().__init__(header + ":\n" + "\n".join("  " + line for line in lines))
