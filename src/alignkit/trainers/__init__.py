"""Trainers: one run lifecycle (`run.RunLoop`), the offline schedule on it (`loop.Trainer`),
the optimizer step (`optimize.OptimizerStep`) and one short trainer per method."""

from __future__ import annotations

from alignkit.trainers.loop import Trainer
from alignkit.trainers.optim import build_lr_scheduler, build_optimizer, lr_multiplier
from alignkit.trainers.optimize import OptimizerStep, StepOutcome
from alignkit.trainers.run import RunLoop, Stateful
from alignkit.trainers.runtime import EpochShuffleSampler, LoopState, seed_everything

__all__ = [
    "EpochShuffleSampler",
    "LoopState",
    "OptimizerStep",
    "RunLoop",
    "Stateful",
    "StepOutcome",
    "Trainer",
    "build_lr_scheduler",
    "build_optimizer",
    "lr_multiplier",
    "seed_everything",
]
