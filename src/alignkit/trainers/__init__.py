"""Trainers: the offline schedule (`loop.Trainer`) and the online one (`online.OnlineTrainer`) on
the run machinery of `alignkit.runloop`, and one short trainer per method."""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the CLI reads the method registry and the config classes of this
    # package without importing torch (`alignkit train grpo --help` answers at once).
    if name == "Trainer":
        from alignkit.trainers.loop import Trainer

        return Trainer
    raise AttributeError(f"module 'alignkit.trainers' has no attribute {name!r}")
