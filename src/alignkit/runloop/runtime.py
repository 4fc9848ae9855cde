"""What the training loop runs on: the accelerator, data order, metric averaging, its state.

Kept apart from :mod:`alignkit.runloop.run` and :mod:`alignkit.trainers.loop` so they read
as the lifecycle and the schedule.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedType, parse_flag_from_env, set_seed
from torch import Tensor, nn
from torch.utils.data import Sampler

from alignkit.config import EarlyStoppingConfig, RunConfig
from alignkit.errors import ConfigError
from alignkit.runloop.precision import drop_autocast_wrapper


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); call before building models."""
    set_seed(seed)


def process_device() -> torch.device:
    """The device of this process, as the Accelerator will see it (its process state is
    created here if it is not yet, with ``accelerate launch --cpu`` honoured as accelerate does)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device


def make_accelerator(
    config: RunConfig, gradient_accumulation_steps: int = 1, *, precision: str | None = None
) -> Accelerator:
    """The Accelerator for `config`: bf16 autocast or none (`precision`, the chosen one of
    ``runloop.precision``; default ``config.precision``, which must then be explicit), and the
    accumulation steps its ``backward`` divides by (and DeepSpeed accumulates over).

    Models it prepares keep their own ``forward`` (:func:`~alignkit.runloop.precision.
    drop_autocast_wrapper`): the run opens ``accelerator.autocast()`` around every forward."""
    chosen = precision or config.precision
    if chosen not in ("fp32", "bf16"):
        raise ValueError(f"make_accelerator needs fp32 or bf16, got {chosen!r} (resolve it first)")
    mixed_precision = "bf16" if chosen == "bf16" else "no"
    _refuse_fsdp_on_cpu()
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed_precision):
        if PartialState().num_processes > 1:
            raise ConfigError(
                f"precision {chosen} differs from an earlier trainer in this "
                "distributed job; use one precision per launch"
            )
        # One process, nothing distributed to break: accelerate keeps its precision in a
        # process-wide singleton, so a notebook that trains fp32 then bf16 must reset it.
        AcceleratorState._reset_state()
    return _Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )


class _Accelerator(Accelerator):
    """accelerate's Accelerator, less the mixed-precision wrapper on prepared models."""

    def prepare_model(self, model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        prepared = super().prepare_model(model, *args, **kwargs)
        drop_autocast_wrapper(model)
        return prepared


def _refuse_fsdp_on_cpu() -> None:
    """FSDP asked for (``accelerate launch --use_fsdp``) where accelerate cannot give it.

    accelerate 1.15 turns FSDP on only for GPUs and other accelerators: on CPU processes
    FSDP version 2 silently trains with DDP instead, and version 1 fails in accelerate's
    plugin with "There are currently no available devices found".
    """
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    state = PartialState()
    if state.device.type == "cpu" and state.distributed_type != DistributedType.FSDP:
        raise ConfigError(
            "accelerate launch --use_fsdp on CPU processes: accelerate 1.15 shards with FSDP "
            "only on GPUs or other accelerators, and would train with DDP here. Launch "
            "without --use_fsdp (DDP over gloo), or on GPUs"
        )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (ConfigError if the model cannot)."""
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and without extra hooks.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x spelling
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        raise ConfigError(
            f"gradient_checkpointing=true but {type(model).__name__} does not support it "
            "(no activation_checkpointing_enable or gradient_checkpointing_enable method)"
        )
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False


class EpochShuffleSampler(Sampler[int]):
    """A permutation of the dataset that depends only on (seed, epoch), not on global RNG.

    So every process draws the same order, and a resumed run the same order as the
    interrupted one.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))
        return iter(order.tolist())


def as_scalar(value: Tensor | float, device: torch.device) -> Tensor:
    """A 0-dim float32 tensor on `device` (a tensor with several elements is averaged)."""
    if isinstance(value, Tensor):
        return value.detach().float().mean()
    return torch.tensor(float(value), device=device)


class MetricMeans:
    """Sums of scalar metrics over calls, kept on the device (no sync per micro-batch).

    Metrics given to :meth:`add` are averaged over calls, then over processes; those given to
    :meth:`add_totals` (shares of a step's loss) are summed over calls and processes.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.totals: dict[str, Tensor] = {}
        self.calls = 0
        self.names: frozenset[str] | None = None

    def add(self, metrics: Mapping[str, Tensor | float], device: torch.device) -> None:
        names = frozenset(metrics)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise RuntimeError(
                f"compute_loss returned metrics {sorted(names)} after {sorted(self.names)}: "
                "return the same names on every call"
            )
        for name, value in metrics.items():
            scalar = as_scalar(value, device)
            self.sums[name] = self.sums[name] + scalar if name in self.sums else scalar
        self.calls += 1

    def add_totals(self, values: Mapping[str, Tensor | float], device: torch.device) -> None:
        for name, value in values.items():
            scalar = as_scalar(value, device)
            self.totals[name] = self.totals[name] + scalar if name in self.totals else scalar

    @property
    def all_names(self) -> list[str]:
        return sorted(self.sums) + sorted(self.totals)

    def mean_across_processes(self, accelerator: Accelerator) -> dict[str, Tensor]:
        """Means over calls here then over processes, and totals; resets (one all-reduce)."""
        if not self.calls and not self.totals:
            return {}
        names = sorted(self.sums)
        total_names = sorted(self.totals)
        values = [self.sums[n] / self.calls for n in names]
        values += [self.totals[n] for n in total_names]
        stacked = torch.stack(values)
        if accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, reduction="sum")
            stacked = torch.cat(
                [stacked[: len(names)] / accelerator.num_processes, stacked[len(names) :]]
            )
        self.sums, self.totals, self.calls = {}, {}, 0
        return dict(zip(names + total_names, stacked.unbind(), strict=True))


class Throughput:
    """Non-pad tokens and model FLOPs (``runloop.flops``) per second of training time
    (evaluation and saving excluded)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.tokens = torch.zeros((), device=accelerator.device)
        self.flops = torch.zeros((), device=accelerator.device)
        self.counting = True
        self.counting_flops = True
        self.seconds = 0.0
        self._since = time.perf_counter()

    def add(self, tokens: Tensor | int | None, flops: Tensor | float | None = None) -> None:
        """Count ``tokens`` (None: throughput is not reported) and their model FLOPs (None:
        MFU is not reported)."""
        if tokens is None:
            self.counting = False
        else:
            self.tokens = self.tokens + tokens
        if flops is None:
            self.counting_flops = False
        else:
            self.flops = self.flops + flops

    def pause(self) -> None:
        self.seconds += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()

    def flush(self) -> tuple[float | None, float | None]:
        """Tokens and model FLOPs per second (all processes together) since the last flush;
        None where uncounted."""
        totals = torch.stack([self.tokens.float(), self.flops.float()])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        tokens, flops = totals.tolist()
        seconds = max(self.seconds, 1e-9)
        rates = (
            tokens / seconds if self.counting else None,
            flops / seconds if self.counting and self.counting_flops else None,
        )
        self.tokens = torch.zeros((), device=self.accelerator.device)
        self.flops = torch.zeros((), device=self.accelerator.device)
        self.seconds = 0.0
        return rates


@dataclass
class LoopState:
    """Where training is; all of it goes into every checkpoint (`stop_reason` aside)."""

    step: int = 0
    epoch: int = 0  # index of the epoch in progress
    batches_in_epoch: int = 0  # micro-batches of that epoch consumed, per process
    window_sums: dict[str, Tensor] = field(default_factory=dict)  # per-step means, summed
    window_steps: int = 0
    latest: dict[str, float] = field(default_factory=dict)  # lr and controller values
    last_record: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stop_reason: str | None = None

    def add_step(self, step_metrics: Mapping[str, Tensor], latest: Mapping[str, float]) -> None:
        """Count one optimizer step into the logging window."""
        for name, value in step_metrics.items():
            previous = self.window_sums.get(name)
            self.window_sums[name] = value if previous is None else previous + value
        self.window_steps += 1
        self.latest = dict(latest)

    def flush_window(self) -> dict[str, float]:
        """Per-batch metrics averaged over the window's steps, plus the latest state values."""
        record: dict[str, float] = {}
        if self.window_steps:
            names = sorted(self.window_sums)
            means = torch.stack([self.window_sums[n] for n in names]) / self.window_steps
            record = dict(zip(names, means.tolist(), strict=True))  # one device sync
        self.window_sums, self.window_steps = {}, 0
        return {**record, **self.latest}

    def observe_evaluation(self, rule: EarlyStoppingConfig, metrics: Mapping[str, float]) -> bool:
        """Track the best value of the early-stopping metric; True when it is time to stop."""
        self.last_eval = dict(metrics)
        if not rule.metric:
            return False
        if rule.metric not in metrics:
            # The trainers do not declare their evaluation's names ahead of it, so the first
            # evaluation is where a misspelling shows.
            message = (
                f"eval.early_stopping.metric={rule.metric!r} is not among the evaluation "
                f"metrics (first evaluation, step {self.step}): {', '.join(sorted(metrics))}"
            )
            nearest = difflib.get_close_matches(rule.metric, list(metrics), n=1)
            if nearest:
                message += f". Did you mean {nearest[0]!r}?"
            raise ConfigError(message)
        value = metrics[rule.metric]
        if self.best_metric is None:
            improved = True
        elif rule.direction == "min":
            improved = value < self.best_metric - rule.min_delta
        else:
            improved = value > self.best_metric + rule.min_delta
        if improved:
            self.best_metric, self.best_step = value, self.step
            self.evals_without_improvement = 0
            return False
        self.evals_without_improvement += 1
        return self.evals_without_improvement >= rule.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "window_sums": {k: v.detach().cpu() for k, v in self.window_sums.items()},
            "window_steps": self.window_steps,
            "latest": self.latest,
            "last_record": self.last_record,
            "last_eval": self.last_eval,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_in_epoch = state["batches_in_epoch"]
        self.window_sums = {k: v.to(device) for k, v in state["window_sums"].items()}
        self.window_steps = state["window_steps"]
        self.latest, self.last_record = dict(state["latest"]), dict(state["last_record"])
        self.last_eval = dict(state["last_eval"])
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
