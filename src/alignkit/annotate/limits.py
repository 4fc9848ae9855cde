"""Range checks shared by the CLI options, the HTTP query parameters and the library calls of the
labelling server: every number is finite and in range, or a one-line error names the setting."""

from __future__ import annotations

import math

from alignkit.errors import ConfigError

__all__ = ["MAX_ID", "check_number"]

# Ids are INTEGER columns: 32-bit on PostgreSQL; SQLite would take 64 bits, but no round reaches
# 2^31 rows, and one bound on both backends keeps a huge id a plain "not found".
MAX_ID = 2**31 - 1


def check_number(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    integer: bool = False,
) -> float:
    """``value`` if it is a finite number (an integer when ``integer``) with ``low <= value <=
    high`` (``low < value`` when ``low_open``); otherwise a ConfigError naming ``name``."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    wanted = f"{'an integer' if integer else 'a finite number'}{' ' if bounds else ''}{' and '.join(bounds)}"
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")
    return value
