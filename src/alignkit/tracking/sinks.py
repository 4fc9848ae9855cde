"""Where logged metrics go: metrics.jsonl (always), the console, TensorBoard, W&B.

Every sink has `log(step, metrics)` and `close()`. Only the main process opens sinks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import string
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from alignkit.errors import CheckpointError, ConfigError
from alignkit.tracking.io import atomic_write_text, to_jsonable
from alignkit.tracking.run_dir import RunDir


class MetricSink(Protocol):
    """Receives one record of metrics per logged optimizer step."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """`metrics.jsonl`: one JSON object per logged step, `{"step": .., "epoch": .., ...}`.

    Each record is flushed as it is written, so a crash loses nothing already logged. When
    resuming from the checkpoint of step `resume_step`, records after that step are removed
    first: the resumed run writes them again, and the file ends up as an uninterrupted run's.
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._file = self.path.open("w", encoding="utf-8")
        else:
            truncate_metrics(self.path, resume_step)
            self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(to_jsonable(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of `path` with step <= `last_step`; returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):  # torn by the crash we are resuming from
                dropped += 1
                continue
            raise CheckpointError(f"{path}:{number}: not a metrics record") from None
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


class ConsoleSink:
    """A rich progress bar (steps, elapsed, ETA, key metrics) and an optional line per log.

    `line_format` is a `str.format` template over the record's metric names plus `step`,
    `total_steps`, `epoch` (fractional) and `epoch_number` (1-based), e.g. Safe-DPO's
    ``"Epoch {epoch_number} step {step} loss_H={loss_H:.4f} lambda={lambda:.4f}"``. A record
    lacking a field the template names (an evaluation-only record) prints no line. Without a
    template, a plain line is printed when the console is not a terminal (logs of batch jobs).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        progress_bar: bool = True,
        line_format: str | None = None,
        key_metrics: Sequence[str] = ("loss",),
        description: str = "training",
        console: Console | None = None,
        step_label: str = "step",
        epoch_label: str = "epoch",
    ) -> None:
        self.total_steps = total_steps
        self.labels = (step_label, epoch_label)  # the plain line's words for step and epoch
        self.key_metrics = tuple(key_metrics)
        self.line_format = line_format or None
        self._fields = _template_fields(self.line_format) if self.line_format else ()
        self.console = console or Console()
        self._plain_lines = line_format is None and not self.console.is_terminal
        self._progress: Progress | None = None
        if progress_bar:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=self.console,
            )
            self._task = self._progress.add_task(
                escape(description), total=total_steps, completed=start_step, metrics=""
            )
            self._progress.start()

    def advance(self, step: int) -> None:
        """Move the bar to optimizer step `step` (called every step, so the ETA is smooth)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        shown = [k for k in self.key_metrics if k in metrics]
        if self._progress is not None and shown:
            text = "  ".join(f"{k}={_short(metrics[k])}" for k in shown)
            self._progress.update(self._task, metrics=escape(text))
        line = self.format_line(step, metrics)
        if line:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def format_line(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """The text line for this record, or None when there is none to print."""
        epoch = float(metrics.get("epoch", 0.0))
        context = {
            **metrics,
            "step": step,
            "total_steps": self.total_steps,
            "epoch": epoch,
            "epoch_number": max(1, math.ceil(epoch)),
        }
        if self.line_format:
            if any(name not in context for name in self._fields):
                return None
            return self.line_format.format_map(context)
        if not self._plain_lines:
            return None
        names = [k for k in metrics if k in self.key_metrics or k.startswith("eval/")]
        parts = [f"{self.labels[0]} {step}/{self.total_steps}", f"{self.labels[1]} {epoch:.2f}"]
        parts += [f"{k}={_short(metrics[k])}" for k in names]
        return " ".join(parts)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _template_fields(template: str) -> tuple[str, ...]:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(
            f"logging.console_format {template!r} is not a valid template: {exc}"
        ) from None
    if any(name == "" or name.isdigit() for name in fields):
        raise ConfigError(
            f"logging.console_format {template!r} must name its fields, e.g. {{loss:.4f}}"
        )
    return tuple(fields)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _require_package(package: str, sink: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"logging.report_to asks for '{sink}' but the '{package}' package is not installed: "
            f"pip install 'alignkit[{sink}]', or remove '{sink}' from logging.report_to"
        )


class TensorBoardSink:
    """Scalars under `<run>/tensorboard`; on resume, events after `resume_step` are purged."""

    def __init__(self, log_dir: str | Path, *, resume_step: int | None = None) -> None:
        _require_package("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        purge_step = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A Weights & Biases run; a resumed alignkit run continues the same W&B run.

    W&B keeps the first value logged for a step, so after a resume it drops the re-logged
    steps between the checkpoint and the crash (metrics.jsonl has the exact record).
    """

    def __init__(
        self, run_dir: RunDir, *, project: str, run_name: str, config: Mapping[str, Any]
    ) -> None:
        _require_package("wandb", "wandb")
        import wandb

        id_file = run_dir.root / "wandb" / "alignkit-run-id"
        if id_file.exists():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            atomic_write_text(id_file, run_id)
        self._run = wandb.init(
            project=project,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir.root),
            config=dict(config),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


def check_sinks_available(report_to: Sequence[str]) -> None:
    """ConfigError for an unknown sink name or one whose package is not installed."""
    unknown = sorted(set(report_to) - {"jsonl", "tensorboard", "wandb"})
    if unknown:
        raise ConfigError(f"logging.report_to: unknown sink(s) {unknown}")
    for sink in ("tensorboard", "wandb"):
        if sink in report_to:
            _require_package(sink, sink)


def open_sinks(
    run_dir: RunDir,
    report_to: Sequence[str],
    *,
    resume_step: int | None = None,
    run_name: str = "run",
    config: Mapping[str, Any] | None = None,
    wandb_project: str = "alignkit",
) -> list[MetricSink]:
    """metrics.jsonl plus the sinks named in `report_to` (ConfigError if one is unavailable)."""
    check_sinks_available(report_to)  # before anything is written
    sinks: list[MetricSink] = [JsonlSink(run_dir.metrics_path, resume_step=resume_step)]
    if "tensorboard" in report_to:
        sinks.append(TensorBoardSink(run_dir.tensorboard_dir, resume_step=resume_step))
    if "wandb" in report_to:
        sinks.append(
            WandbSink(run_dir, project=wandb_project, run_name=run_name, config=config or {})
        )
    return sinks
