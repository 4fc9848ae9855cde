"""Run directories, metric sinks, atomic checkpoints and plots (the bottom layer)."""

from __future__ import annotations

from alignkit.tracking.checkpoint import (
    TRAINER_STATE_FILE,
    capture_rng_state,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    save_model_weights,
)
from alignkit.tracking.plots import plot_metrics
from alignkit.tracking.run_dir import RunDir, read_metrics, write_summary
from alignkit.tracking.sinks import (
    ConsoleSink,
    JsonlSink,
    MetricSink,
    TensorBoardSink,
    WandbSink,
    check_sinks_available,
    open_sinks,
    truncate_metrics,
)

__all__ = [
    "TRAINER_STATE_FILE",
    "ConsoleSink",
    "JsonlSink",
    "MetricSink",
    "RunDir",
    "TensorBoardSink",
    "WandbSink",
    "capture_rng_state",
    "check_sinks_available",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "load_trainer_state",
    "open_sinks",
    "plot_metrics",
    "prune_checkpoints",
    "read_metrics",
    "restore_rng_state",
    "save_checkpoint",
    "save_model_weights",
    "truncate_metrics",
    "write_summary",
]
