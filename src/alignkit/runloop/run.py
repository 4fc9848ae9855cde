"""The run lifecycle every schedule shares: run directory, resume, sinks, evaluation, checkpoints.

:class:`RunLoop` knows nothing about *what* a step is. A schedule subclasses it (the offline
:class:`~alignkit.trainers.loop.Trainer`: epochs over a dataset; the online trainers: iterations
of rollout then update) and implements three methods:

  - ``_prepare_training()``: build loaders, prepare models with ``self.accelerator``, call
    :meth:`RunLoop.add_optimizer` for every trained model and set ``self.total_steps``;
  - ``_run()``: the schedule; after each step (an optimizer step offline, an iteration online)
    it calls :meth:`RunLoop.end_step` with the step's metrics, and stops when that returns True;
    before returning it sets ``self.state.stop_reason`` if nothing else did;
  - ``_data_order_settings()``: what fixes the data each step sees; a resume must keep it.

``train()`` is the template: check the setup, find the checkpoint to resume, prepare the run
directory, ``_prepare_training()``, ``on_train_begin()``, restore, open the sinks, ``_run()``,
then write the summary and plots.

A checkpoint ``checkpoints/step-N/`` holds one directory per model of :meth:`checkpoint_models`
(the primary model, :attr:`primary_model_name`, is the one the run produces and later commands
load; models registered with :meth:`register_model` sit next to it) and ``trainer_state.pt``:
optimizer and scheduler states by name, skip counters, controllers, loop state, the subclass'
:meth:`_extra_state` and every process' RNG state (written and read by
:class:`~alignkit.runloop.checkpointing.Checkpointing`, the part of RunLoop that does it).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, SequentialSampler

from alignkit.config import RunConfig, config_to_dict, library_versions
from alignkit.errors import AlignkitError, ConfigError
from alignkit.runloop.allocator import retain_freed_memory
from alignkit.runloop.checkpointing import Checkpointing, Stateful
from alignkit.runloop.flops import ModelFlops, peak_matmul_rate
from alignkit.runloop.optimizer import OptimizerStep
from alignkit.runloop.precision import resolve_precision
from alignkit.runloop.runtime import (
    EpochShuffleSampler,
    LoopState,
    Throughput,
    make_accelerator,
    process_device,
    seed_everything,
)
from alignkit.tracking import (
    ConsoleSink,
    MetricSink,
    RunDir,
    capture_rng_state,
    check_sinks_available,
    checkpoint_step,
    open_sinks,
    plot_metrics,
    restore_rng_state,
    write_summary,
)

__all__ = ["Metrics", "RunLoop", "Stateful"]

Metrics = Mapping[str, "Tensor | float"]


class RunLoop(Checkpointing, ABC):
    """Run lifecycle shared by the offline and the online schedules (see the module doc)."""

    #: Line printed at each logging step (see LoggingConfig.console_format); None: none.
    console_format: ClassVar[str | None] = None
    #: Words for the step counter and the epoch in the progress line (online: iteration).
    step_label: ClassVar[str] = "step"
    epoch_label: ClassVar[str] = "epoch"
    #: Metrics shown next to the progress bar.
    progress_metrics: ClassVar[tuple[str, ...]] = ("loss",)
    #: The model the run produces, saved as `step-N/<name>/` in Hugging Face format with the
    #: tokenizer; it is ``self.model`` (the offline trainers: "model"; the policy online).
    primary_model_name: ClassVar[str] = "model"

    def __init__(
        self,
        config: RunConfig,
        model: nn.Module,
        *,
        tokenizer: Any | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.config = config
        #: What the run computes in (``runloop.precision``: ``auto`` resolved for this model
        #: and device); under bf16 every forward runs inside ``self.accelerator.autocast()``.
        self.precision = resolve_precision(config.precision, model, process_device())
        self.accelerator = make_accelerator(
            config, self._gradient_accumulation_steps(config), precision=self.precision.name
        )
        seed_everything(config.seed)
        self.model = model  # wrapped for the device setup once _prepare_training prepares it
        self.tokenizer = tokenizer
        self.collate_fn = collate_fn
        self.run_dir = RunDir(config.run_dir)
        self.console = Console()
        self.total_steps = 0
        self.state = LoopState()
        self.optimizer_steps: dict[str, OptimizerStep] = {}
        self.sinks: list[MetricSink] = []
        self.progress: ConsoleSink | None = None
        self.throughput: Throughput | None = None
        self._controllers: dict[str, Stateful] = {}
        self._extra_models: dict[str, nn.Module] = {}
        self.model_flops: ModelFlops | None = None  # of the prepared model, set by train()
        self._peak_flops_per_s: float | None = None

    # ----------------------------------------------------------------- what a schedule writes

    @abstractmethod
    def _prepare_training(self) -> None:
        """Prepare models, optimizers (:meth:`add_optimizer`) and data; set total_steps."""

    @abstractmethod
    def _run(self) -> None:
        """The schedule: steps, each ended by :meth:`end_step`, until it returns True."""

    @abstractmethod
    def _data_order_settings(self) -> dict[str, Any]:
        """What fixes which data a step sees; a resume with other values is refused."""

    # ----------------------------------------------------------------- optional hooks

    def _gradient_accumulation_steps(self, config: RunConfig) -> int:
        """What accelerate's ``backward`` divides by (:class:`OptimizerStep` undoes it, so
        any value gives the same gradient) and DeepSpeed's accumulation; default 1."""
        return 1

    def on_train_begin(self) -> None:
        """Called once models, optimizers and loaders are prepared, before any step."""
        return None  # an optional hook: nothing to do unless a trainer needs it

    def evaluate(self) -> dict[str, float]:
        """Evaluation metrics (``eval/<name>``); called in eval mode with the RNG isolated."""
        return {}

    def _has_evaluation(self) -> bool:
        return type(self).evaluate is not RunLoop.evaluate

    def _record_fields(self) -> dict[str, float]:
        """Fields written first in every metrics record (the offline loop: ``epoch``)."""
        return {}

    def _extra_state(self) -> dict[str, Any]:
        """Schedule state to checkpoint besides LoopState (tensors and plain values only)."""
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned."""
        return None  # nothing saved by default, nothing to restore

    # ----------------------------------------------------------------- helpers for subclasses

    def add_optimizer(
        self,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> OptimizerStep:
        """Register a prepared ``(model, optimizer, scheduler)``: its states are checkpointed
        under `name` and restored on resume. Returns the :class:`OptimizerStep` to call once
        per optimizer step."""
        if name in self.optimizer_steps:
            raise ValueError(f"an optimizer named {name!r} is already registered")
        step = OptimizerStep(
            self.accelerator,
            model,
            optimizer,
            scheduler,
            max_grad_norm=self.config.optim.max_grad_norm,
            max_consecutive_skipped_steps=self.config.optim.max_consecutive_skipped_steps,
            name=name,
            say=self._say,
        )
        self.optimizer_steps[name] = step
        return step

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite gradient norm, all optimizers together."""
        return sum(step.skipped_steps for step in self.optimizer_steps.values())

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """Put a model that is not trained (reference, reward) on the device, in eval mode."""
        model.requires_grad_(False).eval()
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def ordered_loader(self, dataset: Any, examples_per_device: int | None = None) -> Any:
        """Batches of `dataset` in order, sharded over processes, on the device."""
        size = examples_per_device or self.config.eval.examples_per_device
        return self.accelerator.prepare_data_loader(self._loader(dataset, size, shuffle=False))

    def _loader(self, dataset: Any, examples_per_device: int, *, shuffle: bool) -> DataLoader:
        """A loader of `dataset` in `collate_fn` batches: a seeded shuffle per epoch
        (:class:`EpochShuffleSampler`, ``set_epoch``) or the dataset's order."""
        sampler = (
            EpochShuffleSampler(len(dataset), self.config.seed)
            if shuffle
            else SequentialSampler(dataset)
        )
        on_gpu = self.accelerator.device.type == "cuda"
        return DataLoader(
            dataset,
            batch_size=examples_per_device,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.config.dataloader_workers,
            pin_memory=on_gpu,
            # Its own generator: creating an iterator must not draw from the global RNG,
            # or a resumed run's dropout masks would differ from the uninterrupted run's.
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    @property
    def peak_flops_per_s(self) -> float:
        """The dense matmul rate of this device in the run's precision at the model's shapes
        (``runloop.flops``), what ``mfu`` is a share of; measured once, when first asked."""
        if self._peak_flops_per_s is None:
            shapes = self.model_flops.shapes if self.model_flops is not None else (1, 1)
            self._peak_flops_per_s = peak_matmul_rate(
                self.precision.dtype, shapes, self.accelerator.device
            )
        return self._peak_flops_per_s

    # ----------------------------------------------------------------- the template

    def train(self) -> dict[str, Any]:
        """Run the schedule (resuming if asked) and return the summary."""
        cfg = self.config
        self._check_setup()
        checkpoint = self._shared(self._find_resume_checkpoint)
        resume_step = None
        if checkpoint is not None:
            resume_step = checkpoint_step(checkpoint)
            self.run_dir = RunDir(checkpoint.parent.parent)  # <run>/checkpoints/step-N
        changes = self._shared(lambda: self._prepare_run_dir(resume_step))
        if cfg.retain_freed_memory and self.accelerator.device.type == "cpu":
            retain_freed_memory()
        self._print_setup()
        self._prepare_training()
        self.model_flops = ModelFlops.of(self.unwrapped_model)
        with self.accelerator.autocast():  # e.g. DPO's reference pass: the run's precision
            self.on_train_begin()
        if checkpoint is not None:
            self._restore(checkpoint)
            self._apply_changes(changes or [])
            self._say(f"resumed from {checkpoint} (step {self.state.step})")
        self.sinks, self.progress = [], None
        if self.accelerator.is_main_process:
            self.sinks = open_sinks(
                self.run_dir,
                ["jsonl", *cfg.logging.report_to],
                resume_step=resume_step if cfg.resume_from else None,
                run_name=cfg.run_name,
                config=config_to_dict(cfg),
                wandb_project=cfg.logging.wandb_project,
            )
            line_format = cfg.logging.console_format
            self.progress = ConsoleSink(
                self.total_steps,
                start_step=self.state.step,
                progress_bar=cfg.logging.progress_bar,
                line_format=self.console_format if line_format is None else line_format,
                key_metrics=self.progress_metrics,
                description=cfg.run_name,
                console=self.console,
                step_label=self.step_label,
                epoch_label=self.epoch_label,
            )
            self.sinks.append(self.progress)
        self.throughput = Throughput(self.accelerator)
        started = time.perf_counter()
        try:
            self._run()
        finally:
            for sink in self.sinks:
                sink.close()
        return self._finish(time.perf_counter() - started)

    def _check_setup(self) -> None:
        """Mistakes that can be seen before anything is written or loaded."""
        cfg = self.config
        metric = cfg.eval.early_stopping.metric
        if metric and not self._has_evaluation():
            raise ConfigError(
                f"eval.early_stopping.metric={metric!r} needs evaluation: give an eval dataset"
            )
        check_sinks_available(cfg.logging.report_to)

    # ----------------------------------------------------------------- end of a step

    def end_step(
        self, metrics: Mapping[str, Tensor], values: Mapping[str, float] | None = None
    ) -> bool:
        """Count one step and evaluate, log, checkpoint as due; True when the run must stop.

        `metrics` are 0-dim tensors, already averaged over the step's micro-batches and over
        processes (identical on every process); they are averaged again over the logging
        window. `values` (learning rate, controller values) are logged as they are now.
        ``skipped_steps`` is added once a step was skipped. Call it on every process.
        """
        state = self.state
        if self.throughput is not None:
            self.throughput.pause()
        state.step += 1
        latest = {k: float(v) for k, v in (values or {}).items()}
        if self.skipped_steps:
            latest["skipped_steps"] = float(self.skipped_steps)
        state.add_step(metrics, latest)
        if self.progress is not None:
            self.progress.advance(state.step)
        final = self._evaluate_log_save()
        if self.throughput is not None:
            self.throughput.resume()
        return final

    def _evaluate_log_save(self) -> bool:
        cfg, state = self.config, self.state
        eval_metrics = self._evaluate_if_due()
        final = state.step >= self.total_steps or state.stop_reason is not None
        record: dict[str, float] = {}
        if final or state.step % cfg.logging.every == 0:
            record = state.flush_window()
            tokens_per_s, flops_per_s = (
                self.throughput.flush() if self.throughput is not None else (None, None)
            )
            if tokens_per_s is not None:
                record["tokens_per_s"] = tokens_per_s
            if flops_per_s is not None:
                record["mfu"] = flops_per_s / self.peak_flops_per_s
            state.last_record = dict(record)
        record.update(eval_metrics)
        if record:
            record = {**self._record_fields(), **record}
            for sink in self.sinks:
                sink.log(state.step, record)
        every = cfg.checkpoint.every
        # Early stopping's best evaluation gets a checkpoint, kept whatever keep_last says.
        new_best = bool(eval_metrics) and state.best_step == state.step
        if final or (every and state.step % every == 0) or new_best:
            self.save_checkpoint()
        return final

    # ----------------------------------------------------------------- evaluation

    def _evaluate_if_due(self) -> dict[str, float]:
        cfg, state = self.config, self.state
        if not self._has_evaluation():
            return {}
        due = cfg.eval.every is not None and state.step % cfg.eval.every == 0
        if not due and state.step < self.total_steps:
            return {}
        metrics = self._run_evaluation()
        rule = cfg.eval.early_stopping
        if state.observe_evaluation(rule, metrics):
            state.stop_reason = "early_stopping"
            self._say(
                f"early stopping at step {state.step}: {rule.metric} has not improved for "
                f"{rule.patience} evaluations (best {state.best_metric:.6g} at step "
                f"{state.best_step})"
            )
        return metrics

    def _run_evaluation(self) -> dict[str, float]:
        # Evaluation must not shift the training RNG: the training curve then does not
        # depend on how often one evaluates.
        rng = capture_rng_state()
        self.model.eval()
        try:
            with self.accelerator.autocast():
                metrics = {k: float(v) for k, v in self.evaluate().items()}
        finally:
            self.model.train()
            restore_rng_state(rng)
        if self.accelerator.num_processes > 1:  # every process must take the same decisions
            shared = [metrics]
            broadcast_object_list(shared, from_process=0)
            metrics = shared[0]
        return metrics

    # ----------------------------------------------------------------- end of training

    def _summary_fields(self) -> dict[str, Any]:
        """Schedule-specific summary entries (the offline loop: ``epoch``)."""
        return self._record_fields()

    def _finish(self, seconds: float) -> dict[str, Any]:
        cfg, state = self.config, self.state
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir.root),
            "step": state.step,
            "total_steps": self.total_steps,
            **self._summary_fields(),
            "stop_reason": state.stop_reason,
            "skipped_steps": self.skipped_steps,
            "metrics": state.last_record,
            "eval": state.last_eval,
            "best": self._best_summary(),
            "last_checkpoint": str(self.run_dir.checkpoint_dir(state.step)),
            "train_seconds": round(seconds, 3),
            "precision": self.precision.as_dict(),
            "peak_flops_per_s": self._peak_flops_per_s,
            "versions": library_versions(),
        }
        if self.accelerator.is_main_process:
            write_summary(self.run_dir, summary)
            if cfg.logging.plots:
                plot_metrics(self.run_dir.metrics_path, self.run_dir.plots_dir)
        self.accelerator.wait_for_everyone()
        return summary

    def _best_summary(self) -> dict[str, Any] | None:
        """Early stopping's best evaluation and the checkpoint that holds it (said once)."""
        rule, state = self.config.eval.early_stopping, self.state
        if not rule.metric or state.best_step is None:
            return None
        checkpoint = self.run_dir.checkpoint_dir(state.best_step)
        self._say(
            f"best {rule.metric} {state.best_metric:.6g} at step {state.best_step}: {checkpoint}"
        )
        return {
            "metric": rule.metric,
            "value": state.best_metric,
            "step": state.best_step,
            "checkpoint": str(checkpoint),
        }

    # ----------------------------------------------------------------- plumbing

    def _print_setup(self) -> None:
        """The start-up table: the chosen precision and why, the device and processes."""
        if not self.accelerator.is_main_process or not self.config.logging.progress_bar:
            return
        table = Table(title="run set-up", show_header=False)
        rows = [
            ("precision", self.precision.name),
            (f"why ({self.precision.requested})", self.precision.reason),
            ("device", str(self.accelerator.device)),
            ("processes", str(self.accelerator.num_processes)),
            ("torch threads per process", str(torch.get_num_threads())),
        ]
        for label, value in rows:
            table.add_row(label, value)
        self.console.print(table)

    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def _shared(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the main process and give every process its result or its error."""
        if self.accelerator.num_processes == 1:
            return fn()
        outcome: list[Any] = [None, None]
        if self.accelerator.is_main_process:
            try:
                outcome = [fn(), None]
            except AlignkitError as exc:
                outcome = [None, exc]
        broadcast_object_list(outcome, from_process=0)
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]
