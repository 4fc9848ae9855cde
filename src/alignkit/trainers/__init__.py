"""Trainers: the offline schedule (`loop.Trainer`) and the online one (`online.OnlineTrainer`) on
the run machinery of `alignkit.runloop`, and one short trainer per method."""

from __future__ import annotations

from alignkit.trainers.loop import Trainer

__all__ = ["Trainer"]
