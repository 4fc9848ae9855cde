"""The offline schedule of every offline trainer (SFT, reward/cost models, DPO family).

A method trainer subclasses :class:`Trainer` and writes the algorithm, nothing else::

    class MyTrainer(Trainer):
        def compute_loss(self, model, batch):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = ops.some_loss(logits, batch)
            return loss, {"accuracy": ...}

:class:`Trainer` is one schedule on :class:`~alignkit.runloop.run.RunLoop` (run directory,
resume, sinks, evaluation, checkpoints): epochs over a dataset in a seeded shuffle, each
optimizer step made by an :class:`~alignkit.runloop.optimizer.OptimizerStep` from
``grad_accum_steps`` micro-batches of ``examples_per_device`` rows (AdamW and its schedule,
clipping, bf16 autocast, skipping a step whose gradient norm is not finite). It runs on
`accelerate.Accelerator`: one process, or `accelerate launch` for DDP, FSDP or DeepSpeed.
Resuming from a checkpoint gives the same metrics as an uninterrupted run: it restores weights,
optimizer, scheduler, controllers, the logging window and every RNG, and skips exactly the
batches of the epoch already consumed.

Loss normalisation: ``compute_loss`` returns the mean of its loss over the micro-batch's
units (``loss_units``: rows by default, completion tokens for SFT); the step's loss is the mean
over the units of all its micro-batches on all processes, so the gradient does not depend on
how a step is split (see :mod:`alignkit.runloop.optimizer`). The logged ``loss`` is that
unit-weighted mean of the step; the other metrics are means over micro-batches and processes.

Hooks, all optional but `compute_loss`:
  - ``compute_loss(model, batch) -> (loss, metrics)``: no side effects (it also runs in eval).
  - ``loss_units(batch)``: what ``loss`` is a mean over, counted in `batch` (default: rows).
  - ``after_optimizer_step(metrics) -> extra metrics``: update controllers (Lagrange
    multiplier, adaptive KL) from this step's metrics, identical on every process
    (``state.step`` still counts the steps before this one).
  - ``evaluate() -> metrics``: default averages ``compute_loss`` metrics over the eval set.
  - ``count_tokens(batch)``: default ``attention_mask.sum()``, for ``tokens_per_s``.
  - ``count_flops(batch)``: default from ``count_tokens`` and the scored tokens, for ``mfu``.
  - ``on_train_begin()``: once models are on their device, before the first step.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor, nn

from alignkit.config import TrainConfig
from alignkit.data.tokenize import IGNORE_INDEX
from alignkit.errors import AlignkitError
from alignkit.runloop.optimizer import (
    OptimizerStep,
    StepOutcome,
    build_lr_scheduler,
    build_optimizer,
)
from alignkit.runloop.run import Metrics, RunLoop, Stateful
from alignkit.runloop.runtime import MetricMeans, as_scalar, enable_gradient_checkpointing

__all__ = ["Metrics", "Stateful", "Trainer", "batch_rows"]


class Trainer(RunLoop):
    """Base class of offline trainers; subclasses implement :meth:`compute_loss`."""

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        train_dataset: Any,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        eval_dataset: Any | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        super().__init__(config, model, tokenizer=tokenizer, collate_fn=collate_fn)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.train_loader: Any = None
        self.eval_loader: Any = None
        self.optimizer_step: OptimizerStep | None = None
        self._train_metrics = MetricMeans()
        self._names_checked = False
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)

    # ----------------------------------------------------------------- hooks to override

    @abstractmethod
    def compute_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        """The loss to minimise on `batch` (a mean over its :meth:`loss_units`) and metrics
        to log (scalars; tensors averaged)."""

    def loss_units(self, batch: Any) -> Tensor | int:
        """How many units the loss of `batch` is a mean over; default: its rows."""
        return batch_rows(batch)

    def after_optimizer_step(self, metrics: Mapping[str, Tensor]) -> Metrics | None:
        """Called after each optimizer step with its metrics (0-dim tensors, the mean over
        micro-batches and processes, so identical on every process). Update controllers here
        and return their values (Python floats) to log as they are now, not averaged."""
        return None

    def evaluate(self) -> dict[str, float]:
        """Metrics on the eval set; default: `compute_loss` metrics as `eval/<name>`.

        The default weighs every batch equally (the last, smaller one too). The loop calls it
        in eval mode and restores train mode and the RNG afterwards. An override must give the
        same values on every process (the main process' values are the ones used).
        """
        if self.eval_loader is None:
            return {}
        totals = MetricMeans()
        with torch.no_grad():
            for batch in self.eval_loader:
                with self.accelerator.autocast():
                    loss, metrics = self.compute_loss(self.model, batch)
                totals.add({"loss": loss, **metrics}, self.accelerator.device)
        means = totals.mean_across_processes(self.accelerator)
        return {f"eval/{name}": float(value) for name, value in means.items()}

    def count_tokens(self, batch: Any) -> Tensor | int | None:
        """Non-pad tokens in `batch` (for tokens_per_s); None: do not report throughput."""
        if isinstance(batch, Mapping):
            mask = batch.get("attention_mask")
            if isinstance(mask, Tensor):
                return mask.sum()
            ids = batch.get("input_ids")
            if isinstance(ids, Tensor):
                return ids.numel()
        return None

    def count_flops(self, batch: Any) -> Tensor | float | None:
        """Model FLOPs of a forward + backward on `batch` (``runloop.flops``: 6 per weight per
        token of :meth:`count_tokens`, the LM head on the tokens a loss scores: ``labels`` not
        -100, or ``response_mask``), for ``mfu``; None: not reported."""
        tokens = self.count_tokens(batch)
        if tokens is None or self.model_flops is None:
            return None
        return self.model_flops.training(tokens, scored_tokens(batch))

    # ----------------------------------------------------------------- the primary optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.optimizer_step.optimizer if self.optimizer_step else None

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        return self.optimizer_step.scheduler if self.optimizer_step else None

    # ----------------------------------------------------------------- the schedule

    def _gradient_accumulation_steps(self, config: TrainConfig) -> int:
        return config.grad_accum_steps

    def _has_evaluation(self) -> bool:
        return self.eval_dataset is not None or type(self).evaluate is not Trainer.evaluate

    def _check_setup(self) -> None:
        if self.train_dataset is None or len(self.train_dataset) == 0:
            raise AlignkitError("the training dataset has no examples")
        super()._check_setup()

    def _prepare_training(self) -> None:
        cfg = self.config
        train_loader = self._loader(self.train_dataset, cfg.examples_per_device, shuffle=True)
        optimizer = build_optimizer(self.model, cfg.optim)
        if self.eval_dataset is not None:
            eval_loader = self._loader(
                self.eval_dataset, cfg.eval.examples_per_device, shuffle=False
            )
            self.model, optimizer, self.train_loader, self.eval_loader = self.accelerator.prepare(
                self.model, optimizer, train_loader, eval_loader
            )
        else:
            self.model, optimizer, self.train_loader = self.accelerator.prepare(
                self.model, optimizer, train_loader
            )
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        # Stepped by hand once per optimizer step: accelerate's prepared scheduler would
        # step once per process and need a total scaled by the process count.
        scheduler = build_lr_scheduler(optimizer, cfg.optim, self.total_steps)
        self.optimizer_step = self.add_optimizer(
            self.primary_model_name, self.model, optimizer, scheduler
        )

    def _run(self) -> None:
        state = self.state
        self.model.train()
        while state.step < self.total_steps and state.stop_reason is None:
            for window in self._epoch_windows():
                state.batches_in_epoch += len(window)
                outcome = self.optimizer_step.run(
                    window, self._loss_share, self.loss_units, step=state.step + 1
                )
                if state.batches_in_epoch == len(self.train_loader):
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if self._end_optimizer_step(outcome):
                    break
        if state.stop_reason is None:
            state.stop_reason = "max_steps" if self.config.max_steps else "epochs"

    def _loss_share(self, batch: Any, units: Tensor) -> Tensor:
        """This micro-batch's share of the step loss: its mean loss x its units / all units."""
        acc = self.accelerator
        loss, metrics = self.compute_loss(self.model, batch)
        mine = torch.as_tensor(self.loss_units(batch), dtype=torch.float32, device=acc.device)
        share = loss * (mine / units)
        self._train_metrics.add(metrics, acc.device)
        self._train_metrics.add_totals({"loss": share}, acc.device)
        self.throughput.add(self.count_tokens(batch), self.count_flops(batch))
        return share

    def _epoch_windows(self) -> Iterator[list[Any]]:
        """This epoch's micro-batches, `grad_accum_steps` at a time (the last window may be
        shorter), minus those a resumed run already consumed."""
        size = self.config.grad_accum_steps
        window: list[Any] = []
        for batch in self._epoch_batches():
            window.append(batch)
            if len(window) == size:
                yield window
                window = []
        if window:
            yield window

    def _epoch_batches(self) -> Any:
        self.train_loader.set_epoch(self.state.epoch)
        if self.state.batches_in_epoch:
            return self.accelerator.skip_first_batches(
                self.train_loader, self.state.batches_in_epoch
            )
        return self.train_loader

    def _end_optimizer_step(self, outcome: StepOutcome) -> bool:
        self._check_metric_names()
        step_metrics = self._train_metrics.mean_across_processes(self.accelerator)
        if outcome.grad_norm is not None:
            step_metrics["grad_norm"] = as_scalar(outcome.grad_norm, self.accelerator.device)
        extra = self.after_optimizer_step(step_metrics) or {}
        return self.end_step(step_metrics, {"lr": outcome.lr, **extra})

    def _check_metric_names(self) -> None:
        """Once: every process must log the same names, or the reductions would hang."""
        if self._names_checked or self.accelerator.num_processes == 1:
            return
        names = self._train_metrics.all_names
        everyone = gather_object([names])
        if any(other != names for other in everyone):
            raise RuntimeError(f"processes log different metrics: {everyone}")
        self._names_checked = True

    def _epoch_progress(self) -> float:
        batches = len(self.train_loader)
        return self.state.epoch + self.state.batches_in_epoch / batches

    def _record_fields(self) -> dict[str, float]:
        return {"epoch": self._epoch_progress()}

    def _data_order_settings(self) -> dict[str, int]:
        cfg = self.config
        return {
            "num_processes": self.accelerator.num_processes,
            "examples_per_device": cfg.examples_per_device,
            "grad_accum_steps": cfg.grad_accum_steps,
            "seed": cfg.seed,
            "train_examples": len(self.train_dataset),
        }


def scored_tokens(batch: Any) -> Tensor | int:
    """Tokens of `batch` whose log-prob enters a loss: ``labels`` other than -100 (SFT), else
    ``response_mask`` (preference pairs); 0 when it holds neither (a reward model)."""
    if isinstance(batch, Mapping):
        labels, response = batch.get("labels"), batch.get("response_mask")
        if isinstance(labels, Tensor) and labels.dtype == torch.long:
            return (labels != IGNORE_INDEX).sum()
        if isinstance(response, Tensor):
            return response.sum()
    return 0


def batch_rows(batch: Any) -> int:
    """Rows of a batch: the first dimension of its first tensor (1 if it holds none)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (list, tuple)) or isinstance(batch, Mapping):
        for value in values:
            if isinstance(value, Tensor) and value.ndim:
                return value.shape[0]
    return 1
