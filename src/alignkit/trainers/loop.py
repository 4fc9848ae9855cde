"""The one training loop of every offline trainer (SFT, reward/cost models, DPO family).

A method trainer subclasses :class:`Trainer` and writes the algorithm, nothing else::

    class MyTrainer(Trainer):
        def compute_loss(self, model, batch):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = ops.some_loss(logits, batch)
            return loss, {"accuracy": ...}

The loop runs on `accelerate.Accelerator`: one process, or `accelerate launch` for DDP, FSDP
or DeepSpeed (it never starts a process group of its own). It owns data order (a seeded
shuffle per epoch), gradient accumulation, clipping, AdamW and its schedule, bf16 autocast,
logging (metrics averaged over micro-batches, processes and the logging window), evaluation
with early stopping, atomic checkpoints and resume. Resuming from a checkpoint gives the same
metrics as an uninterrupted run: it restores weights, optimizer, scheduler, controllers, the
logging window and every RNG, and skips exactly the batches of the epoch already consumed.

Hooks, all optional but `compute_loss`:
  - ``compute_loss(model, batch) -> (loss, metrics)``: no side effects (it also runs in eval).
  - ``after_optimizer_step(metrics) -> extra metrics``: update controllers (Lagrange
    multiplier, adaptive KL) from this step's metrics, identical on every process.
  - ``evaluate() -> metrics``: default averages ``compute_loss`` metrics over the eval set.
  - ``count_tokens(batch)``: default ``attention_mask.sum()``, for ``tokens_per_s``.
  - ``on_train_begin()``: once models are on their device, before the first step.
"""

from __future__ import annotations

import math
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, SequentialSampler

from alignkit.config import TrainConfig, config_to_dict, library_versions, save_resolved_config
from alignkit.errors import AlignkitError, CheckpointError, ConfigError
from alignkit.tracking import (
    ConsoleSink,
    MetricSink,
    RunDir,
    capture_rng_state,
    check_sinks_available,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    open_sinks,
    plot_metrics,
    restore_rng_state,
    save_checkpoint,
    write_summary,
)
from alignkit.tracking.checkpoint import TRAINER_STATE_FILE
from alignkit.trainers.optim import build_lr_scheduler, build_optimizer
from alignkit.trainers.runtime import (
    EpochShuffleSampler,
    LoopState,
    MetricMeans,
    Throughput,
    as_scalar,
    enable_gradient_checkpointing,
    make_accelerator,
    seed_everything,
)

Metrics = Mapping[str, "Tensor | float"]
_STATE_FORMAT = 1


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state is checkpointed: controllers, running statistics."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Trainer(ABC):
    """Base class of offline trainers; subclasses implement :meth:`compute_loss`."""

    #: Line printed at each logging step (see LoggingConfig.console_format); None: none.
    console_format: ClassVar[str | None] = None
    #: Metrics shown next to the progress bar.
    progress_metrics: ClassVar[tuple[str, ...]] = ("loss",)

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
        self.config = config
        self.accelerator = make_accelerator(config)
        seed_everything(config.seed)
        self.model = model  # wrapped for the device setup once train() prepares it
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collate_fn = collate_fn
        self.tokenizer = tokenizer
        self.run_dir = RunDir(config.run_dir)
        self.console = Console()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.train_loader: Any = None
        self.eval_loader: Any = None
        self.total_steps = 0
        self.state = LoopState()
        self._controllers: dict[str, Stateful] = {}
        self._train_metrics = MetricMeans()
        self._names_checked = False
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)

    # ----------------------------------------------------------------- hooks to override

    @abstractmethod
    def compute_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, Metrics]:
        """The loss to minimise on `batch` and metrics to log (scalars; tensors averaged)."""

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

    def on_train_begin(self) -> None:
        """Called once models, optimizer and loaders are prepared, before any step."""
        return None  # an optional hook: nothing to do unless a trainer needs it

    def checkpoint_models(self) -> dict[str, nn.Module]:
        """Models saved in each checkpoint, as `step-N/<name>/`."""
        return {"model": self.unwrapped_model}

    def restore_model_weights(self, model: nn.Module, directory: Path) -> None:
        """Load a checkpointed model's weights in place (override for custom formats)."""
        load_model_weights(model, directory)

    # ----------------------------------------------------------------- helpers for subclasses

    def register_controller(self, name: str, controller: Stateful) -> None:
        """Checkpoint `controller`'s state_dict under `name` and restore it on resume."""
        if not isinstance(controller, Stateful):
            raise TypeError(f"controller {name!r} needs state_dict() and load_state_dict()")
        if name in self._controllers:
            raise ValueError(f"a controller named {name!r} is already registered")
        self._controllers[name] = controller

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

    # ----------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        """Train to `max_steps` or `epochs` (or early stopping); returns the summary."""
        cfg = self.config
        self._check_setup()
        checkpoint = self._shared(self._find_resume_checkpoint)
        resume_step = None
        if checkpoint is not None:
            resume_step = checkpoint_step(checkpoint)
            self.run_dir = RunDir(checkpoint.parent.parent)  # <run>/checkpoints/step-N
        self._shared(lambda: self._prepare_run_dir(resume_step))
        self._prepare_training()
        self.on_train_begin()
        if checkpoint is not None:
            self._restore(checkpoint)
            self._say(f"resumed from {checkpoint} (step {self.state.step})")
        sinks: list[MetricSink] = []
        progress: ConsoleSink | None = None
        if self.accelerator.is_main_process:
            sinks = open_sinks(
                self.run_dir,
                ["jsonl", *cfg.logging.report_to],
                resume_step=resume_step if cfg.resume_from else None,
                run_name=cfg.run_name,
                config=config_to_dict(cfg),
                wandb_project=cfg.logging.wandb_project,
            )
            line_format = cfg.logging.console_format
            progress = ConsoleSink(
                self.total_steps,
                start_step=self.state.step,
                progress_bar=cfg.logging.progress_bar,
                line_format=self.console_format if line_format is None else line_format,
                key_metrics=self.progress_metrics,
                description=cfg.run_name,
                console=self.console,
            )
            sinks.append(progress)
        started = time.perf_counter()
        try:
            self._run(sinks, progress)
        finally:
            for sink in sinks:
                sink.close()
        return self._finish(time.perf_counter() - started)

    def _check_setup(self) -> None:
        """Mistakes that can be seen before anything is written or loaded."""
        cfg = self.config
        if self.train_dataset is None or len(self.train_dataset) == 0:
            raise AlignkitError("the training dataset has no examples")
        metric = cfg.eval.early_stopping.metric
        if metric and not self._has_evaluation():
            raise ConfigError(
                f"eval.early_stopping.metric={metric!r} needs evaluation: give an eval dataset"
            )
        check_sinks_available(cfg.logging.report_to)

    def _prepare_training(self) -> None:
        cfg = self.config
        train_loader = self._loader(self.train_dataset, cfg.examples_per_device, shuffle=True)
        optimizer = build_optimizer(self.model, cfg.optim)
        if self.eval_dataset is not None:
            eval_loader = self._loader(
                self.eval_dataset, cfg.eval.examples_per_device, shuffle=False
            )
            self.model, self.optimizer, self.train_loader, self.eval_loader = (
                self.accelerator.prepare(self.model, optimizer, train_loader, eval_loader)
            )
        else:
            self.model, self.optimizer, self.train_loader = self.accelerator.prepare(
                self.model, optimizer, train_loader
            )
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        # Stepped by hand once per optimizer step: accelerate's prepared scheduler would
        # step once per process and need a total scaled by the process count.
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, self.total_steps)

    def _loader(self, dataset: Any, examples_per_device: int, *, shuffle: bool) -> DataLoader:
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

    def _run(self, sinks: Sequence[MetricSink], progress: ConsoleSink | None) -> None:
        state = self.state
        self.model.train()
        throughput = Throughput(self.accelerator)
        while state.step < self.total_steps and state.stop_reason is None:
            for batch in self._epoch_batches():
                state.batches_in_epoch += 1
                stepped = self._micro_step(batch, throughput)
                if stepped is None:
                    continue  # still accumulating gradients
                throughput.pause()
                if state.batches_in_epoch == len(self.train_loader):
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                self._end_step(*stepped)
                if progress is not None:
                    progress.advance(state.step)
                if self._evaluate_log_save(sinks, throughput):
                    break
                throughput.resume()
        if state.stop_reason is None:
            state.stop_reason = "max_steps" if self.config.max_steps else "epochs"

    def _micro_step(self, batch: Any, throughput: Throughput) -> tuple[Any, float] | None:
        """Forward and backward one batch, and the optimizer step on the last batch of an
        accumulation; returns (grad_norm, lr) when the optimizer stepped, else None."""
        acc = self.accelerator
        stepped = None
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, metrics = self.compute_loss(self.model, batch)
            acc.backward(loss)  # divides by grad_accum_steps
            self._train_metrics.add({"loss": loss, **metrics}, acc.device)
            throughput.add(self.count_tokens(batch))
            if acc.sync_gradients:
                max_norm = self.config.optim.max_grad_norm or math.inf
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                stepped = (grad_norm, self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()  # a no-op until the accumulation is complete
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def _evaluate_log_save(self, sinks: Sequence[MetricSink], throughput: Throughput) -> bool:
        """Evaluate, log and checkpoint as due after an optimizer step; True after the last."""
        cfg, state = self.config, self.state
        eval_metrics = self._evaluate_if_due()
        final = state.step >= self.total_steps or state.stop_reason is not None
        record: dict[str, float] = {}
        if final or state.step % cfg.logging.every == 0:
            record = state.flush_window()
            tokens_per_s = throughput.flush()
            if tokens_per_s is not None:
                record["tokens_per_s"] = tokens_per_s
            state.last_record = dict(record)
        record.update(eval_metrics)
        if record:
            record = {"epoch": self._epoch_progress(), **record}
            for sink in sinks:
                sink.log(state.step, record)
        every = cfg.checkpoint.every
        if final or (every and state.step % every == 0):
            self.save_checkpoint()
        return final

    def _epoch_batches(self) -> Any:
        """This epoch's batches, minus those a resumed run already consumed."""
        self.train_loader.set_epoch(self.state.epoch)
        if self.state.batches_in_epoch:
            return self.accelerator.skip_first_batches(
                self.train_loader, self.state.batches_in_epoch
            )
        return self.train_loader

    def _end_step(self, grad_norm: Tensor | float | None, lr: float) -> None:
        state = self.state
        state.step += 1
        self._check_metric_names()
        step_metrics = self._train_metrics.mean_across_processes(self.accelerator)
        if grad_norm is not None:
            step_metrics["grad_norm"] = as_scalar(grad_norm, self.accelerator.device)
        extra = self.after_optimizer_step(step_metrics) or {}
        state.add_step(step_metrics, {"lr": float(lr), **{k: float(v) for k, v in extra.items()}})

    def _check_metric_names(self) -> None:
        """Once: every process must log the same names, or the reductions would hang."""
        if self._names_checked or self.accelerator.num_processes == 1:
            return
        names = sorted(self._train_metrics.sums)
        everyone = gather_object([names])
        if any(other != names for other in everyone):
            raise RuntimeError(f"processes log different metrics: {everyone}")
        self._names_checked = True

    def _epoch_progress(self) -> float:
        batches = len(self.train_loader)
        return self.state.epoch + self.state.batches_in_epoch / batches

    # ----------------------------------------------------------------- evaluation

    def _has_evaluation(self) -> bool:
        return self.eval_dataset is not None or type(self).evaluate is not Trainer.evaluate

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
            metrics = {k: float(v) for k, v in self.evaluate().items()}
        finally:
            self.model.train()
            restore_rng_state(rng)
        if self.accelerator.num_processes > 1:  # every process must take the same decisions
            shared = [metrics]
            broadcast_object_list(shared, from_process=0)
            metrics = shared[0]
        return metrics

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Save models and the full trainer state to `checkpoints/step-N` (all processes)."""
        acc = self.accelerator
        rng = capture_rng_state()
        rng_per_process = gather_object([rng]) if acc.num_processes > 1 else [rng]
        models = self.checkpoint_models()
        state_dicts = None
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            state_dicts = {name: acc.get_state_dict(model) for name, model in models.items()}
        path = self.run_dir.checkpoint_dir(self.state.step)
        if acc.is_main_process:
            path = save_checkpoint(
                self.run_dir,
                self.state.step,
                models,
                self.tokenizer,
                self._trainer_state(rng_per_process),
                state_dicts=state_dicts,
                keep_last=self.config.checkpoint.keep_last,
            )
        acc.wait_for_everyone()
        return path

    def _data_order_settings(self) -> dict[str, int]:
        """What fixes which batches a step sees; a resume must keep all of it."""
        cfg = self.config
        return {
            "num_processes": self.accelerator.num_processes,
            "examples_per_device": cfg.examples_per_device,
            "grad_accum_steps": cfg.grad_accum_steps,
            "seed": cfg.seed,
            "train_examples": len(self.train_dataset),
        }

    def _trainer_state(self, rng_per_process: list[dict[str, Any]]) -> dict[str, Any]:
        state = self.state
        return {
            "format": _STATE_FORMAT,
            "step": state.step,
            "epoch": state.epoch,
            "total_steps": self.total_steps,
            "data": self._data_order_settings(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controllers": {name: c.state_dict() for name, c in self._controllers.items()},
            "loop": state.state_dict(),
            "rng": rng_per_process,
        }

    def _find_resume_checkpoint(self) -> Path | None:
        resume_from = self.config.resume_from
        if not resume_from:
            return None
        path = Path(resume_from)
        if checkpoint_step(path) is not None and (path / TRAINER_STATE_FILE).is_file():
            return path  # a checkpoint directory was named
        if not path.is_dir():
            raise CheckpointError(f"resume_from={path}: no such run directory")
        found = latest_checkpoint(path)
        if found is None:
            self._say(f"{path} has no complete checkpoint yet: starting from step 0")
        return found

    def _prepare_run_dir(self, resume_step: int | None) -> None:
        if not self.accelerator.is_main_process:
            return
        run_dir, cfg = self.run_dir, self.config
        if cfg.resume_from is None and run_dir.has_results():
            if not cfg.overwrite:
                raise ConfigError(
                    f"run directory {run_dir.root} already holds a run: continue it with "
                    f"resume_from={run_dir.root}, set overwrite=true, or choose another run_name"
                )
            run_dir.clear_results()
        if cfg.resume_from is not None:
            # Resuming from an older checkpoint abandons the later ones, as it does the later
            # metrics: left in place, the newest would be taken for this run's on a resume.
            for path in list_checkpoints(run_dir):
                if checkpoint_step(path) > (resume_step or 0):
                    shutil.rmtree(path)
                    self._say(f"removed {path}: it comes after the checkpoint resumed from")
        run_dir.create()
        save_resolved_config(cfg, run_dir.config_path)

    def _restore(self, checkpoint: Path) -> None:
        saved = load_trainer_state(checkpoint)
        acc = self.accelerator
        changed = [
            f"{key} {saved['data'].get(key)} -> {value}"
            for key, value in self._data_order_settings().items()
            if saved["data"].get(key) != value
        ]
        if changed:
            raise CheckpointError(
                f"{checkpoint} cannot continue with this setup, the data order would differ "
                f"({'; '.join(changed)}); resume with the original settings"
            )
        for name, model in self.checkpoint_models().items():
            self.restore_model_weights(model, checkpoint / name)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        missing = sorted(set(self._controllers) - set(saved["controllers"]))
        extra = sorted(set(saved["controllers"]) - set(self._controllers))
        if missing or extra:
            raise CheckpointError(
                f"{checkpoint}: controllers differ (not in checkpoint: {missing}; "
                f"not registered now: {extra})"
            )
        for name, controller in self._controllers.items():
            controller.load_state_dict(saved["controllers"][name])
        self.state.load_state_dict(saved["loop"], acc.device)
        restore_rng_state(saved["rng"][acc.process_index])

    # ----------------------------------------------------------------- end of training

    def _finish(self, seconds: float) -> dict[str, Any]:
        cfg, state = self.config, self.state
        rule = cfg.eval.early_stopping
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir.root),
            "step": state.step,
            "total_steps": self.total_steps,
            "epoch": self._epoch_progress(),
            "stop_reason": state.stop_reason,
            "metrics": state.last_record,
            "eval": state.last_eval,
            "best": (
                {"metric": rule.metric, "value": state.best_metric, "step": state.best_step}
                if rule.metric
                else None
            ),
            "last_checkpoint": str(self.run_dir.checkpoint_dir(state.step)),
            "train_seconds": round(seconds, 3),
            "versions": library_versions(),
        }
        if self.accelerator.is_main_process:
            write_summary(self.run_dir, summary)
            if cfg.logging.plots:
                plot_metrics(self.run_dir.metrics_path, self.run_dir.plots_dir)
        self.accelerator.wait_for_everyone()
        return summary

    # ----------------------------------------------------------------- plumbing

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
