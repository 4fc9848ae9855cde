"""Run a pipeline's stages in order, skipping what is done and resuming what was cut short.

The pipeline directory ``<output_dir>/<name>/`` holds one run directory per training stage, a
directory per tool stage, ``pipeline.yaml`` (the resolved stages with their status, key,
artifacts and times, rewritten atomically after every change) and ``summary.json``.

A stage's key is a digest of its resolved config (or tool and args). On a re-run a completed
stage with the same key is skipped; a stage that was running or failed, with the same key and a
checkpoint, resumes from that checkpoint; anything else runs from scratch. ``--from STAGE``
re-runs that stage and every later one from scratch, on the recorded artifacts of the earlier.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alignkit.config import atomic_write_text, config_to_dict, load_config
from alignkit.errors import AlignkitError
from alignkit.pipeline.checks import judge_disagreements
from alignkit.pipeline.spec import PipelineError, PipelineSpec, Stage, resolve
from alignkit.pipeline.tools import TOOL_KEY_METRIC, TOOLS
from alignkit.tracking import latest_checkpoint, read_metrics

__all__ = ["StageRecord", "run_pipeline", "summary_table"]

STATE_FILE = "pipeline.yaml"
#: The metric a training stage's summary row shows: the first of these its run logged.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("eval/loss", "loss"),
    "rm": ("loss",),  # its eval accuracy is often 1.0 from the first evaluation on
    "cost": ("loss",),
    "dpo": ("eval/rewards/margins", "rewards/margins"),
    "safe-dpo": ("eval/rewards/margins", "rewards/margins"),
}
ONLINE_KEY_METRICS = ("reward/mean", "loss")
_VOLATILE = ("resume_from", "overwrite")


@dataclass
class StageRecord:
    name: str
    kind: str
    key: str = ""
    status: str = "pending"  # pending | running | completed | failed
    outcome: str = ""  # ran | resumed | skipped (this invocation)
    seconds: float = 0.0
    error: str | None = None
    metric: str | None = None
    before: float | None = None
    after: float | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # what a check across stages found (alignkit.pipeline.checks)


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_state(root: Path) -> dict[str, StageRecord]:
    path = root / STATE_FILE
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    fields = set(StageRecord.__dataclass_fields__)
    return {
        s["name"]: StageRecord(**{k: v for k, v in s.items() if k in fields})
        for s in raw.get("stages", [])
    }


def _write_state(spec: PipelineSpec, records: list[StageRecord]) -> None:
    state = {"name": spec.name, "source": spec.source, "stages": [asdict(r) for r in records]}
    atomic_write_text(spec.root / STATE_FILE, yaml.safe_dump(state, sort_keys=False))


def _method_config(stage: Stage, spec: PipelineSpec, artifacts: dict, extra: list[str]) -> Any:
    from alignkit.trainers.registry import get_method

    method = get_method(stage.method or "")
    config_class, _ = method.load()
    where = f"{spec.source}: stage {stage.name!r}"
    config = resolve(stage.config, artifacts, where)
    path = config
    if isinstance(config, dict):  # inline: kept beside the stage for the record
        path = spec.root / f"{stage.name}.input.yaml"
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    overrides = [
        *method.defaults,
        *resolve(list(stage.overrides), artifacts, where),
        f"output_dir={spec.root}",
        f"run_name={stage.name}",
        *extra,
    ]
    return load_config(config_class, path, overrides)


def _key_metric(stage: Stage, run_dir: Path) -> tuple[str | None, float | None, float | None]:
    from alignkit.trainers.registry import get_method

    records = (
        read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    )
    online = "rollout" in {
        f for cls in [get_method(stage.method or "").load()[0]] for f in cls.__dataclass_fields__
    }
    for name in KEY_METRICS.get(stage.method or "", ONLINE_KEY_METRICS if online else ("loss",)):
        values = [r[name] for r in records if isinstance(r.get(name), int | float)]
        if values:
            return name, float(values[0]), float(values[-1])
    return None, None, None


class _Run:
    """One invocation: the spec, the records it writes, the artifacts of finished stages."""

    def __init__(self, spec: PipelineSpec, console: Console) -> None:
        self.spec, self.console = spec, console
        self.records = [StageRecord(s.name, s.kind) for s in spec.stages]
        self.artifacts: dict[str, dict[str, Any]] = {}

    def save(self) -> None:
        _write_state(self.spec, self.records)

    def upstream_keys(self) -> list[str]:
        # A stage's inputs may be any earlier stage's outputs (same path, new weights): its key
        # covers every earlier key, so a change upstream re-runs everything after it.
        return [r.key for r in self.records if r.status == "completed"]

    def method(
        self, stage: Stage, record: StageRecord, previous: StageRecord | None, fresh: bool
    ) -> None:
        from alignkit.trainers.registry import get_method

        spec = self.spec
        cfg = _method_config(stage, spec, self.artifacts, [])
        resolved = {k: v for k, v in config_to_dict(cfg).items() if k not in _VOLATILE}
        key = _digest({"config": resolved, "upstream": self.upstream_keys()})
        run_dir = spec.root / stage.name
        if not fresh and previous is not None and previous.key == key:
            if previous.status == "completed":
                record.__dict__.update({**asdict(previous), "outcome": "skipped"})
                return
            checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
            if previous.status in ("running", "failed") and checkpoint is not None:
                record.outcome = "resumed"
                self.console.print(f"resuming {stage.name} from {checkpoint}", markup=False)
        extra = [f"resume_from={run_dir}"] if record.outcome == "resumed" else ["overwrite=true"]
        record.outcome = record.outcome or "ran"
        record.key, record.status = key, "running"
        self.save()
        _, entry_point = get_method(stage.method or "").load()
        summary = entry_point(_method_config(stage, spec, self.artifacts, extra))
        best = summary.get("best") or {}
        checkpoint = Path(summary["last_checkpoint"])
        if best.get("step") is not None and (checkpoint.parent / f"step-{best['step']}").is_dir():
            checkpoint = checkpoint.parent / f"step-{best['step']}"
        record.artifacts = {
            "run_dir": str(run_dir),
            "checkpoint": str(checkpoint),
            "model": str(checkpoint / "model"),
            "metrics": summary.get("metrics") or {},
            "eval": summary.get("eval") or {},
            **_inputs(cfg),
        }
        record.metric, record.before, record.after = _key_metric(stage, run_dir)

    def tool(
        self, stage: Stage, record: StageRecord, previous: StageRecord | None, fresh: bool
    ) -> None:
        args = resolve(stage.args, self.artifacts, f"{self.spec.source}: stage {stage.name!r}")
        key = _digest({"tool": stage.tool, "args": args, "upstream": self.upstream_keys()})
        if (
            not fresh
            and previous is not None
            and previous.key == key
            and previous.status == "completed"
        ):
            record.__dict__.update({**asdict(previous), "outcome": "skipped"})
            return
        record.key, record.status, record.outcome = key, "running", "ran"
        self.save()
        stage_dir = self.spec.root / stage.name
        metrics = TOOLS[stage.tool or ""](args, stage_dir)
        record.artifacts = {"run_dir": str(stage_dir), "metrics": metrics}
        for name in ("model", "rewards"):  # what an evaluation judged, for the checks
            if name in args:
                record.artifacts[name] = args[name]
        record.metric = TOOL_KEY_METRIC[stage.tool or ""]
        record.after = metrics.get(record.metric)

    def stage(
        self, i: int, stage: Stage, record: StageRecord, previous: StageRecord | None, fresh: bool
    ) -> None:
        self.console.rule(
            f"[bold]{i + 1}/{len(self.spec.stages)} {escape(stage.name)} ({escape(stage.kind)})"
        )
        started = time.perf_counter()
        try:
            run = self.method if stage.method is not None else self.tool
            run(stage, record, previous, fresh)
        except AlignkitError as err:
            record.status, record.error = "failed", str(err)
            record.seconds = round(time.perf_counter() - started, 3)
            self.save()
            raise PipelineError(f"stage {stage.name!r} ({stage.kind}) failed: {err}") from None
        except BaseException as err:  # a bug or an interrupt: recorded, then raised as it is
            record.status, record.error = "failed", f"{type(err).__name__}: {err}"
            self.save()
            raise
        if record.outcome == "skipped":
            record.seconds = 0.0
            self.console.print(
                f"{stage.name}: completed before with the same config; skipped", markup=False
            )
        else:
            record.seconds = round(time.perf_counter() - started, 3)
        record.status, record.error = "completed", None
        self.save()


def run_pipeline(
    spec: PipelineSpec, from_stage: str | None = None, console: Console | None = None
) -> list[StageRecord]:
    """Run (or skip, or resume) every stage in order; returns their records.

    Raises:
        PipelineError: a stage failed with a user error (the stage's own message is kept), or
            ``from_stage`` follows a stage that has not completed.
    """
    run = _Run(spec, console or Console(soft_wrap=True))
    spec.root.mkdir(parents=True, exist_ok=True)
    previous = _read_state(spec.root)
    start = spec.index(from_stage) if from_stage is not None else 0
    for i, (stage, record) in enumerate(zip(spec.stages, run.records, strict=True)):
        before = previous.get(stage.name)
        if i < start:  # --from: the earlier stages stand as recorded
            if before is None or before.status != "completed":
                raise PipelineError(
                    f"--from {from_stage}: stage {stage.name!r} before it has "
                    "not completed; run the pipeline without --from first"
                )
            record.__dict__.update({**asdict(before), "outcome": "skipped", "seconds": 0.0})
        else:
            run.stage(i, stage, record, before, fresh=from_stage is not None)
        run.artifacts[stage.name] = record.artifacts
    disagreements = judge_disagreements(run.records)
    for record in run.records:
        record.note = "; ".join(d.text() for d in disagreements if d.stage == record.name)
    table = [
        {
            "stage": r.name,
            "kind": r.kind,
            "outcome": r.outcome,
            "seconds": r.seconds,
            "metric": r.metric,
            "before": r.before,
            "after": r.after,
            "note": r.note,
        }
        for r in run.records
    ]
    summary = {"stages": table, "disagreements": [d.as_dict() for d in disagreements]}
    atomic_write_text(spec.root / "summary.json", json.dumps(summary, indent=2) + "\n")
    return run.records


def summary_table(records: list[StageRecord]) -> Table:
    """One row per stage: what happened, how long, its key metric before -> after, and a note
    where a check across stages found something (a trained reward and a judge disagreeing)."""
    notes = any(r.note for r in records)
    table = Table(title="pipeline summary")
    for column in ("stage", "kind", "outcome", "time", "key metric", "before -> after"):
        table.add_column(column)
    if notes:
        table.add_column("note", style="bold yellow", overflow="fold")
    for r in records:
        change = (
            ""
            if r.after is None
            else (f"{r.after:.3f}" if r.before is None else f"{r.before:.3f} -> {r.after:.3f}")
        )
        cells = [escape(r.name), escape(r.kind), r.outcome, f"{r.seconds:.0f}s"]
        cells += [escape(r.metric or ""), change]
        table.add_row(*cells, *([escape(r.note)] if notes else []))
    return table


def _inputs(cfg: Any) -> dict[str, Any]:
    """What a training stage started from and was trained on, for the checks across stages."""
    found: dict[str, Any] = {}
    model = getattr(cfg, "model", None)
    if model is not None and hasattr(model, "name"):
        found["input_model"] = str(model.name)
    if hasattr(cfg, "rewards"):
        found["reward_sources"] = [
            str(source.get("function") or source.get("model"))
            for source in config_to_dict(cfg).get("rewards", [])
        ]
    return found
