"""The config dataclasses every run shares: optimiser, evaluation, logging, checkpoints, and
the run and offline-schedule settings (`RunConfig`, `TrainConfig`)."""

from __future__ import annotations

import dataclasses
import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from alignkit.errors import ConfigError

T = TypeVar("T")

#: Top-level key of a written config that records library versions; ignored when loading.
VERSIONS_KEY = "_versions"
#: In a run's config.yaml: the settings changed on a resume, each with the step it took effect.
CHANGES_KEY = "_changes"


def config_key(f: dataclasses.Field) -> str:
    """The YAML key of a dataclass field (`lambda_` is written `lambda`)."""
    name = f.name
    if name.endswith("_") and keyword.iskeyword(name[:-1]):
        return name[:-1]
    return name


def field_help(text: str) -> dict[str, str]:
    """Field metadata with help text (shown by `alignkit train METHOD --help`)."""
    return {"help": text}


# --------------------------------------------------------------------------------------
# Settings that only matter under others
# --------------------------------------------------------------------------------------

#: The evaluation settings, which need held-out data.
EVALUATION = ("eval.every", "eval.examples_per_device")


def requires(
    cfg: Any,
    keys: str | tuple[str, ...],
    condition: bool,
    enable: str | None = None,
    *,
    scope: str = "",
    because: str | None = None,
    advice: str | None = None,
) -> None:
    """A setting read only under others' values: changed from its default while `condition`
    is false, it would be silently ignored, so it is a ConfigError that names what enables it.

    `keys` (one or several settings under the same condition) and the setting `enable` starts
    with are dotted YAML paths under `cfg` (`scope` is `cfg`'s own path, for the message). A
    value equal to the dataclass default passes, also when a file writes it out. In
    ``SafetyConfig``,
    ``requires(self, "cost_model", self.source == "cost_model", "source=cost_model",
    scope="safety")`` raises "safety.cost_model is set but has no effect with
    safety.source=data; set safety.source=cost_model to use it". `because` and `advice`
    replace the two halves of that message where the settings need other words.
    """
    changed = [key for key in ((keys,) if isinstance(keys, str) else keys) if is_changed(cfg, key)]
    if condition or not changed:
        return
    prefix = f"{scope}." if scope else ""
    if because is None:
        enabling = re.match(r"[A-Za-z_][\w.]*", enable or "")
        if enabling is None:
            raise ValueError("requires() needs `because` when `enable` names no setting")
        name = enabling.group(0)
        because = f"with {prefix}{name}={shown(setting(cfg, name))}"
    if advice is None:
        advice = f"set {prefix}{enable} to use it"
    raise ConfigError(f"{prefix}{changed[0]} is set but has no effect {because}; {advice}")


def setting(cfg: Any, key: str) -> Any:
    """The value at dotted YAML path `key` under the config `cfg` (`lambda` is `lambda_`)."""
    parent, field_ = _field_at(cfg, key)
    return getattr(parent, field_.name)


def is_changed(cfg: Any, key: str) -> bool:
    """Whether the setting at `key` differs from its dataclass default."""
    parent, field_ = _field_at(cfg, key)
    if field_.default is not dataclasses.MISSING:
        default = field_.default
    elif field_.default_factory is not dataclasses.MISSING:
        default = field_.default_factory()
    else:  # a required field: always given
        return True
    return getattr(parent, field_.name) != default


def shown(value: Any) -> str:
    """A setting's value as YAML writes it (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def _field_at(cfg: Any, key: str) -> tuple[Any, dataclasses.Field]:
    parent, found = cfg, None
    for part in key.split("."):
        if found is not None:
            parent = getattr(parent, found.name)
        fields = {config_key(f): f for f in dataclasses.fields(parent)}
        if part not in fields:
            raise KeyError(f"{type(parent).__name__} has no setting {part!r} (in {key!r})")
        found = fields[part]
    assert found is not None
    return parent, found


# --------------------------------------------------------------------------------------
# Shared sub-configs of every offline trainer
# --------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """AdamW, its learning-rate schedule and gradient clipping."""

    lr: float = field(default=1e-5, metadata=field_help("Peak learning rate of AdamW."))
    betas: tuple[float, float] = field(
        default=(0.9, 0.999), metadata=field_help("AdamW (beta1, beta2).")
    )
    eps: float = field(default=1e-8, metadata=field_help("AdamW epsilon."))
    weight_decay: float = field(
        default=0.0,
        metadata=field_help(
            "Decoupled weight decay; applied to matrices only, never to biases or norms."
        ),
    )
    schedule: Literal["constant", "linear", "cosine"] = field(
        default="linear",
        metadata=field_help(
            "Learning-rate decay after warm-up: constant, linear to 0, or cosine to 0."
        ),
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata=field_help("Fraction of the optimizer steps spent warming up linearly from 0."),
    )
    warmup_steps: int | None = field(
        default=None,
        metadata=field_help("Warm-up length in optimizer steps; overrides warmup_ratio."),
    )
    max_grad_norm: float | None = field(
        default=1.0,
        metadata=field_help("Clip the global gradient norm to this value; null: no clip."),
    )
    max_consecutive_skipped_steps: int = field(
        default=10,
        metadata=field_help(
            "A step whose gradient norm is inf/NaN is skipped; stop the run after more than "
            "this many skipped steps in a row."
        ),
    )

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr must be > 0")
        _require(all(0 <= b < 1 for b in self.betas), "betas must lie in [0, 1)")
        _require(self.eps > 0, "eps must be > 0")
        _require(self.weight_decay >= 0, "weight_decay must be >= 0")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio must lie in [0, 1)")
        _require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0")
        _require(
            self.max_consecutive_skipped_steps >= 0, "max_consecutive_skipped_steps must be >= 0"
        )
        requires(
            self, "warmup_ratio", self.warmup_steps is None, "warmup_steps=null", scope="optim"
        )


@dataclass
class EarlyStoppingConfig:
    """Stop when an evaluation metric has not improved for `patience` evaluations."""

    metric: str | None = field(
        default=None, metadata=field_help("Evaluation metric to watch, e.g. eval/loss; null: off.")
    )
    mode: Literal["auto", "min", "max"] = field(
        default="auto",
        metadata=field_help(
            "Whether a lower (min) or higher (max) value is better; auto: max for accuracy-, "
            "reward-, margin- and win-rate-like names, min otherwise (losses, costs)."
        ),
    )
    patience: int = field(
        default=3, metadata=field_help("Evaluations without improvement before training stops.")
    )
    min_delta: float = field(
        default=0.0, metadata=field_help("Smallest change that counts as an improvement.")
    )

    def __post_init__(self) -> None:
        _require(self.patience >= 1, "patience must be >= 1")
        _require(self.min_delta >= 0, "min_delta must be >= 0")

    @property
    def direction(self) -> Literal["min", "max"]:
        """`mode`, with auto resolved from the metric's name."""
        if self.mode != "auto":
            return self.mode
        name = (self.metric or "").lower()
        higher = ("accurac", "acc", "reward", "margin", "win_rate", "f1", "helpful")
        return "max" if any(word in name for word in higher) and "loss" not in name else "min"


@dataclass
class EvalConfig:
    """When and how to evaluate."""

    every: int | None = field(
        default=None,
        metadata=field_help(
            "Evaluate every N optimizer steps (and at the end); null: at the end only."
        ),
    )
    examples_per_device: int = field(
        default=8,
        metadata=field_help(
            "Evaluation examples per device per forward pass; also the batch of the DPO "
            "family's one-off reference pass."
        ),
    )
    early_stopping: EarlyStoppingConfig = field(
        default_factory=EarlyStoppingConfig,
        metadata=field_help("Early stopping on an eval metric."),
    )

    def __post_init__(self) -> None:
        _require(self.every is None or self.every >= 1, "every must be >= 1")
        _require(self.examples_per_device >= 1, "examples_per_device must be >= 1")


@dataclass
class LoggingConfig:
    """Where metrics go and how often."""

    every: int = field(default=10, metadata=field_help("Log metrics every N optimizer steps."))
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = field(
        default_factory=lambda: ["jsonl"],
        metadata=field_help(
            "Metric sinks; metrics.jsonl is always written. tensorboard and wandb need their "
            "packages installed. A single name is accepted as a one-item list."
        ),
    )
    progress_bar: bool = field(
        default=True, metadata=field_help("Show a progress bar with ETA and key metrics.")
    )
    console_format: str | None = field(
        default=None,
        metadata=field_help(
            "Line printed at each logging step, a str.format template over metric names plus "
            "step, total_steps, epoch (fractional) and epoch_number (1-based), e.g. "
            "'Epoch {epoch_number} step {step} loss={loss:.4f}'. null: the trainer's default; "
            "'': none."
        ),
    )
    wandb_project: str = field(
        default="alignkit", metadata=field_help("W&B project name (report_to: [wandb]).")
    )
    plots: bool = field(
        default=True, metadata=field_help("Write PNG curves into plots/ at the end of training.")
    )

    def __post_init__(self) -> None:
        _require(self.every >= 1, "every must be >= 1")
        requires(
            self,
            "wandb_project",
            "wandb" in self.report_to,
            scope="logging",
            because=f"with logging.report_to={shown(self.report_to)}",
            advice="add wandb to logging.report_to to use it",
        )


@dataclass
class CheckpointConfig:
    """Atomic checkpoints in <run>/checkpoints/step-N/."""

    every: int | None = field(
        default=None,
        metadata=field_help(
            "Save every N optimizer steps (and at the end); null: at the end only."
        ),
    )
    keep_last: int | None = field(
        default=2, metadata=field_help("Keep the newest K checkpoints; null: keep all.")
    )

    def __post_init__(self) -> None:
        _require(self.every is None or self.every >= 1, "every must be >= 1")
        _require(self.keep_last is None or self.keep_last >= 1, "keep_last must be >= 1")


@dataclass
class RunConfig:
    """Settings of every run, whatever its schedule: where it writes, seed, precision,
    optimizer, evaluation, logging and checkpoints (:class:`alignkit.runloop.run.RunLoop`).

    A schedule's config adds its own batch words: :class:`TrainConfig` the offline ones
    (epochs, examples per device, accumulation); an online config prompts and sequences.
    """

    run_name: str = field(
        default="run", metadata=field_help("Run directory name under output_dir.")
    )
    output_dir: str = field(
        default="runs", metadata=field_help("Parent folder of run directories.")
    )
    resume_from: str | None = field(
        default=None,
        metadata=field_help(
            "Run directory to continue from its newest complete checkpoint (writes there)."
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=field_help("Start afresh in an existing run directory, deleting its old results."),
    )
    allow_change: list[str] = field(
        default_factory=list,
        metadata=field_help(
            "On resume: settings that may differ from the run's, e.g. [optim.lr] (CLI: "
            "--allow-change optim.lr). Each applies from the resumed step and is recorded in "
            "config.yaml under _changes; any other difference is refused."
        ),
    )
    seed: int = field(
        default=0, metadata=field_help("Seed of Python, NumPy, torch and data order.")
    )
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto",
        metadata=field_help(
            "auto: bf16 where the device runs bf16 matmuls natively (AMX / AVX-512 BF16 CPUs, "
            "GPUs of compute capability >= 8) and the model is float32 with hidden size >= 128, "
            "else fp32; fp32; or bf16 autocast (weights stay in their dtype). The run's start-up "
            "table and summary.json say which was chosen and why."
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=field_help("Recompute activations in backward to save memory.")
    )
    dataloader_workers: int = field(
        default=0, metadata=field_help("Worker processes that collate batches; 0: in the main one.")
    )
    retain_freed_memory: bool = field(
        default=True,
        metadata=field_help(
            "On CPU with glibc, keep freed memory in the process instead of returning it to the "
            "kernel: steps stop page-faulting, the process does not shrink after its peak."
        ),
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=field_help("Optimizer."))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=field_help("Evaluation."))
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=field_help("Logging."))
    checkpoint: CheckpointConfig = field(
        default_factory=CheckpointConfig, metadata=field_help("Checkpoints.")
    )

    def __post_init__(self) -> None:
        _require(self.dataloader_workers >= 0, "dataloader_workers must be >= 0")
        _require(bool(self.run_name.strip()), "run_name must not be empty")
        requires(
            self,
            "overwrite",
            self.resume_from is None,
            because=f"with resume_from={self.resume_from}",
            advice="a resumed run continues in its own directory; drop one of the two",
        )
        requires(self, "allow_change", self.resume_from is not None, "resume_from (CLI: --resume)")
        # mode, patience and min_delta belong to a watched metric.
        watched = tuple(f"eval.early_stopping.{k}" for k in ("mode", "patience", "min_delta"))
        metric = bool(self.eval.early_stopping.metric)
        requires(self, watched, metric, "eval.early_stopping.metric (e.g. eval/loss)")

    @property
    def run_dir(self) -> Path:
        """Where this run writes: `resume_from` when resuming, else output_dir/run_name."""
        if self.resume_from:
            return Path(self.resume_from)
        return Path(self.output_dir) / self.run_name


@dataclass
class TrainConfig(RunConfig):
    """Settings of the offline loop (epochs over a dataset); every offline trainer's config
    inherits them."""

    epochs: int = field(default=1, metadata=field_help("Passes over the training data."))
    max_steps: int | None = field(
        default=None, metadata=field_help("Stop after this many optimizer steps; overrides epochs.")
    )
    examples_per_device: int = field(
        default=8, metadata=field_help("Training examples (rows) per device per forward pass.")
    )
    grad_accum_steps: int = field(
        default=1, metadata=field_help("Forward passes whose gradients make one optimizer step.")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.epochs >= 1, "epochs must be >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        _require(self.examples_per_device >= 1, "examples_per_device must be >= 1")
        _require(self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
