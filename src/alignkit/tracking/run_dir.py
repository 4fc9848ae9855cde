"""The run directory every training command writes (layout in DESIGN.md).

```
runs/<name>/
  config.yaml          resolved config, with library versions
  metrics.jsonl        one JSON object per logged step
  checkpoints/step-N/  models (Hugging Face format) + trainer_state.pt
  summary.json         final metrics
  plots/*.png          curves made from metrics.jsonl
```
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import CheckpointError
from alignkit.tracking.io import atomic_write_text, to_jsonable


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory; nothing is created until :meth:`create`."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard"

    def checkpoint_dir(self, step: int) -> Path:
        """Where the checkpoint of optimizer step `step` lives once complete."""
        return self.checkpoints_dir / f"step-{step}"

    def create(self) -> RunDir:
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        return self

    def has_results(self) -> bool:
        """Whether an earlier run left metrics or checkpoints here."""
        has_checkpoints = self.checkpoints_dir.is_dir() and any(self.checkpoints_dir.iterdir())
        return self.metrics_path.exists() or has_checkpoints

    def clear_results(self) -> None:
        """Delete what a training run writes (not files the user put here)."""
        for path in (self.metrics_path, self.summary_path, self.config_path):
            path.unlink(missing_ok=True)
        for folder in (self.checkpoints_dir, self.plots_dir, self.tensorboard_dir):
            shutil.rmtree(folder, ignore_errors=True)


def as_run_dir(run_dir: RunDir | str | Path) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def write_summary(run_dir: RunDir | str | Path, summary: Mapping[str, Any]) -> Path:
    """Write `summary.json` (final metrics, stop reason, ...) atomically."""
    path = as_run_dir(run_dir).summary_path
    atomic_write_text(path, json.dumps(to_jsonable(summary), indent=2, sort_keys=False) + "\n")
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, in file order; a torn last line is ignored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no metrics file at {path}")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a crash mid-write leaves at most one torn line, the last
            raise CheckpointError(f"{path}:{number}: not a JSON object") from None
    return records
