"""Trainers: one shared loop (`alignkit.trainers.loop`) and one short trainer per method."""

from __future__ import annotations

from alignkit.trainers.loop import Stateful, Trainer
from alignkit.trainers.optim import build_lr_scheduler, build_optimizer, lr_multiplier
from alignkit.trainers.runtime import EpochShuffleSampler, LoopState, seed_everything

__all__ = [
    "EpochShuffleSampler",
    "LoopState",
    "Stateful",
    "Trainer",
    "build_lr_scheduler",
    "build_optimizer",
    "lr_multiplier",
    "seed_everything",
]
