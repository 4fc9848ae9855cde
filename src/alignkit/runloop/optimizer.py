"""The optimizer of a model: AdamW and its learning-rate schedule (linear warm-up, then constant,
linear or cosine), and one optimizer step: accumulate, normalise, clip, skip if non-finite, step.

:class:`OptimizerStep` is what every schedule (the offline :class:`~alignkit.trainers.Trainer`,
the online trainers) calls once per optimizer step with the micro-batches of that step.

Loss normalisation (DESIGN, "over the whole optimizer step"). A step's loss is

    L = (sum of the per-unit losses of every micro-batch on every process) / N

where a unit is what the trainer averages over (a completion token for SFT, a sequence or a
pair for the sequence-level losses) and N is the number of units of the whole step: all
micro-batches of the accumulation window on all processes. N is all-reduced *before* the first
backward, then each micro-batch's ``loss_fn(batch, N)`` returns its share ``sum_i / N``, so the
gradient is that of L however the step is split into micro-batches and processes (TRL's
``num_items_in_batch``, verl's ``agg_loss(..., global_batch_size, dp_size)``). The two factors
the runtime divides by are undone here, in one place: DDP/FSDP *average* gradients over the P
processes and ``accelerate``'s ``backward`` divides by ``gradient_accumulation_steps`` G, so the
share is multiplied by ``P * G`` before the backward.

Metrics are weighted the same way. Besides its loss share, ``loss_fn`` may return the
micro-batch's shares of other step quantities, each ``(sum over the micro-batch) / (the step's
global count of what it averages)``: a policy-gradient term, an entropy mean, a clip fraction
weighted by tokens. :attr:`StepOutcome.metrics` holds their sums over the micro-batches times P,
so that their mean over processes (what ``MetricMeans`` takes) is the step's value, however the
step is split.

A step whose gradient norm is not finite (inf/NaN) is skipped: no parameter changes and the
optimizer state (Adam's moments and step count) is untouched; the gradients are dropped. It is
counted (``skipped_steps``) and reported; more than ``max_consecutive_skipped_steps`` skipped
steps in a row raise :class:`~alignkit.errors.TrainingDivergedError`. The learning-rate schedule
still advances, so the learning rate stays a function of the step number. Under DeepSpeed the
engine steps inside ``backward`` and applies its own overflow check instead.

Under FSDP each process holds a shard of every parameter and of its Adam moments, so the
optimizer's own ``state_dict`` (integer ids, this process' shards) describes 1/P of the state.
:meth:`OptimizerStep.state_dict` then gathers the full state keyed by parameter name
(``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` with
``full_state_dict=True``): one file, as the model weights are one gathered Hugging Face
checkpoint, that does not depend on how many processes shard it and loads with or without
FSDP. :meth:`OptimizerStep.load_state_dict` takes either form.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from alignkit.config import OptimConfig
from alignkit.errors import CheckpointError, ModelError, TrainingDivergedError

Batch = TypeVar("Batch")
#: ``loss_fn(batch, N)``: the micro-batch's loss share, alone or with its metric shares.
LossShare = Tensor | tuple[Tensor, Mapping[str, Tensor]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters.

    Weight decay applies to matrices (embeddings, projections) only: decaying biases and
    norm gains toward 0 only hurts (the usual convention of BERT/GPT training code).
    """
    matrices, vectors = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (matrices if parameter.ndim >= 2 else vectors).append(parameter)
    if not matrices and not vectors:
        raise ModelError(f"{type(model).__name__} has no trainable parameters")
    groups = [
        {"params": params, "weight_decay": decay}
        for params, decay in ((matrices, cfg.weight_decay), (vectors, 0.0))
        if params
    ]
    # The fused kernel updates every tensor in one pass (about 4% of a tiny-model step on CPU);
    # it exists for CPU and CUDA floating-point parameters only.
    fused = all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in (*matrices, *vectors)
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warm-up length in optimizer steps: `warmup_steps` if set, else a share of the total."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return round(cfg.warmup_ratio * total_steps)


def lr_multiplier(step: int, *, schedule: str, warmup: int, total_steps: int) -> float:
    """Factor on the peak learning rate for the optimizer step with 0-based index `step`.

    Warm-up rises linearly to 1 so that its first step already moves (1/warmup, not 0); the
    decay then reaches 1/(total-warmup) of the peak at the last step, never exactly 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(progress, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> LambdaLR:
    """A `LambdaLR` stepped once per optimizer step, following :func:`lr_multiplier`."""
    warmup = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        return lr_multiplier(step, schedule=cfg.schedule, warmup=warmup, total_steps=total_steps)

    return LambdaLR(optimizer, factor)


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    loss: Tensor  #: this process' part of the step loss (sum of the micro-batch shares), detached
    units: Tensor  #: N, the step's global unit count (float32, on the device)
    grad_norm: Tensor | None  #: before clipping; None when the backend does not report it
    lr: float  #: learning rate used by this step (the first parameter group's)
    skipped: bool  #: the gradient norm was not finite and the update was skipped
    #: ``loss_fn``'s metric shares summed over the micro-batches, times the process count:
    #: averaged over processes they are the step's values (detached, float32)
    metrics: dict[str, Tensor] = field(default_factory=dict)


class OptimizerStep:
    """Optimizer steps of one ``(model, optimizer, scheduler)``, all prepared by accelerate.

    Args:
        accelerator: the run's accelerator.
        model, optimizer, scheduler: as returned by ``accelerator.prepare`` (the scheduler is
            stepped by hand once per optimizer step, not prepared).
        max_grad_norm: clip the global gradient norm to this; None: measure only.
        max_consecutive_skipped_steps: raise after more non-finite steps than this in a row.
        name: the name this pair is checkpointed under (used in messages).
        say: prints a console line (on the main process); skipped steps are reported there.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        max_grad_norm: float | None,
        max_consecutive_skipped_steps: int = 10,
        name: str = "model",
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.name = name
        self.say = say or (lambda _message: None)
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self._parameters: list[nn.Parameter] | None = None

    def global_units(self, counts: Sequence[Tensor | int | float]) -> Tensor:
        """N: the units of this process' micro-batches summed over all processes (>= 1)."""
        acc = self.accelerator
        local = torch.zeros((), dtype=torch.float32, device=acc.device)
        for count in counts:
            local = local + torch.as_tensor(count, dtype=torch.float32, device=acc.device)
        total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        # An all-empty step (no unit anywhere) has a zero loss; 1 keeps it finite.
        return total.clamp_min(1.0)

    def run(
        self,
        micro_batches: Sequence[Batch],
        loss_fn: Callable[[Batch, Tensor], LossShare],
        count_fn: Callable[[Batch], Tensor | int | float],
        *,
        step: int,
    ) -> StepOutcome:
        """Make optimizer step number `step` (1-based, for messages) from `micro_batches`.

        ``count_fn(batch)`` is the number of loss units in a micro-batch; ``loss_fn(batch, N)``
        returns the micro-batch's share of the step loss, ``(sum of its unit losses) / N``
        (e.g. ``ops.losses.aggregate_loss(..., normaliser=N)``), optionally with a mapping of
        metric shares (see the module docstring) as ``(share, metrics)``. It runs under
        autocast. Every process must pass the same number of micro-batches.
        """
        if not micro_batches:
            raise ValueError("an optimizer step needs at least one micro-batch")
        acc, model = self.accelerator, self.model
        units = self.global_units([count_fn(batch) for batch in micro_batches])
        # Undo DDP's mean over processes and accelerate's division by the accumulation steps.
        scale = acc.num_processes * acc.gradient_accumulation_steps
        step_loss = torch.zeros((), dtype=torch.float32, device=acc.device)
        sums: dict[str, Tensor] = {}
        last = len(micro_batches) - 1
        try:
            for index, batch in enumerate(micro_batches):
                syncing = index == last
                # Tells accelerate's wrappers (DeepSpeed, the optimizer) whether this backward
                # ends the accumulation; DDP/FSDP skip the gradient all-reduce until then.
                acc.sync_gradients = syncing
                with nullcontext() if syncing else acc.no_sync(model):
                    with acc.autocast():
                        share = loss_fn(batch, units)
                    if not isinstance(share, Tensor):
                        share, parts = share
                        for name, value in parts.items():
                            sums[name] = sums.get(name, 0.0) + value.detach().float()
                    acc.backward(share * scale)
                step_loss = step_loss + share.detach().float()
        finally:
            acc.sync_gradients = True  # accelerate's state is process-wide
        metrics = {name: value * acc.num_processes for name, value in sums.items()}
        max_norm = self.max_grad_norm or math.inf
        # One process without a gradient scaler: accelerate's wrappers add nothing but their
        # per-call checks (an importlib lookup per step, a signature inspection per
        # zero_grad), ~0.2 ms of a tiny model's step; torch's own calls then do it all.
        direct = acc.distributed_type == DistributedType.NO and acc.scaler is None
        optimizer = self._torch_optimizer if direct else self.optimizer
        if direct:
            # Listed once (walking the module tree costs ~0.2 ms a step), in the model's order:
            # the norm's summation order is accelerate's, so runs do not change by round-off.
            if self._parameters is None:
                self._parameters = list(model.parameters())
            with_grads = [p for p in self._parameters if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(with_grads, max_norm)
        else:
            grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):  # FSDP2: a partial norm on each shard
            grad_norm = grad_norm.full_tensor()
        lr = float(self.optimizer.param_groups[0]["lr"])
        skipped = grad_norm is not None and not bool(torch.isfinite(grad_norm).all())
        if skipped:
            self._skip(step, grad_norm)
        else:
            self.consecutive_skipped = 0
            optimizer.step()
        with warnings.catch_warnings():
            # A skipped first step calls the scheduler before any optimizer.step(): intended.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(step_loss, units, grad_norm, lr, skipped, metrics)

    @property
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer inside accelerate's wrapper (torch's state-dict functions want it)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _skip(self, step: int, grad_norm: Tensor) -> None:
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        in_a_row = self.consecutive_skipped
        self.say(
            f"step {step}: gradient norm of {self.name} is {float(grad_norm)}; optimizer step "
            f"skipped ({in_a_row} in a row, {self.skipped_steps} in all)"
        )
        if in_a_row > self.max_consecutive_skipped_steps:
            raise TrainingDivergedError(
                f"step {step}: {in_a_row} optimizer steps of {self.name} in a row had a "
                f"non-finite gradient norm (more than optim.max_consecutive_skipped_steps="
                f"{self.max_consecutive_skipped_steps}); lower optim.lr, set "
                "optim.max_grad_norm, use precision=fp32, or look for inf/NaN in the data"
            )

    @property
    def sharded(self) -> bool:
        """Whether FSDP shards the parameters and the optimizer state over the processes."""
        return self.accelerator.distributed_type == DistributedType.FSDP

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and scheduler state plus the skip counters.

        Under FSDP the optimizer state is the full one keyed by parameter name, gathered on
        the CPU of the main process (empty elsewhere): call it on every process.
        """
        if self.sharded:
            optimizer = get_optimizer_state_dict(
                self.model, self._torch_optimizer, options=_FULL_ON_MAIN_CPU
            )
        else:
            optimizer = self.optimizer.state_dict()
        return {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "consecutive_skipped": self.consecutive_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (every process passes the whole of it)."""
        optimizer = state["optimizer"]
        by_name = is_keyed_by_name(optimizer)
        if self.sharded and not by_name:
            raise CheckpointError(
                f"the optimizer state of {self.name} was saved without FSDP (keyed by the "
                "optimizer's parameter ids, not by parameter names): resume it without FSDP"
            )
        if by_name:
            # Every process slices its own shards out of the full state.
            set_optimizer_state_dict(
                self.model,
                self._torch_optimizer,
                optimizer,
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skipped = int(state.get("consecutive_skipped", 0))


_FULL_ON_MAIN_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    """Whether an optimizer state dict is keyed by parameter name (FSDP's full form) rather
    than by the optimizer's integer ids (``torch.optim.Optimizer.state_dict``)."""
    params = [p for group in optimizer_state.get("param_groups", []) for p in group["params"]]
    return bool(params) and all(isinstance(p, str) for p in params)
