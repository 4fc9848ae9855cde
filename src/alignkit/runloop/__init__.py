"""The run machinery every trainer stands on: the run lifecycle (`run.RunLoop`: run directory,
resume, sinks, evaluation; `checkpointing`: what a checkpoint holds, writing and restoring it),
the optimizer and its step (`optimizer`: AdamW, the learning-rate schedule, `OptimizerStep`),
the loop state and process set-up (`runtime`), what a resume may change (`resume`), the
compute precision (`precision`), model FLOPs (`flops`) and the CPU allocator setting
(`allocator`). Algorithms live in `alignkit.trainers`."""

from __future__ import annotations

from alignkit.runloop.optimizer import (
    OptimizerStep,
    StepOutcome,
    build_lr_scheduler,
    build_optimizer,
    lr_multiplier,
)
from alignkit.runloop.run import RunLoop, Stateful
from alignkit.runloop.runtime import EpochShuffleSampler, LoopState, seed_everything

__all__ = [
    "EpochShuffleSampler",
    "LoopState",
    "OptimizerStep",
    "RunLoop",
    "Stateful",
    "StepOutcome",
    "build_lr_scheduler",
    "build_optimizer",
    "lr_multiplier",
    "seed_everything",
]
