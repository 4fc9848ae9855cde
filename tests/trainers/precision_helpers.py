"""Running a trainer's first steps in fp32 and in bf16 and comparing them (parity tests)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from alignkit.tracking import read_metrics


@dataclass
class FirstSteps:
    """What a short run did: its metrics records and the gradient each optimizer step applied
    (flattened, float32, in the optimizers' order within a step)."""

    records: list[dict[str, Any]]
    gradients: list[torch.Tensor]
    precision: str

    def metric(self, name: str) -> list[float]:
        return [r[name] for r in self.records if name in r]


@contextmanager
def captured_gradients() -> Iterator[list[torch.Tensor]]:
    """The gradient of every ``optimizer.step()`` in the block, as it reaches the optimizer."""
    steps: list[torch.Tensor] = []

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [
            p.grad.detach().float().flatten()
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        steps.append(torch.cat(grads))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


class ReplayEngine:
    """An engine that records what the wrapped one generates, or replays a recording: so that
    an online trainer's bf16 run updates on the fp32 run's samples (a bf16 engine samples a
    slightly different distribution, and the first differing token changes the whole run)."""

    def __init__(self, engine: Any, recording: list[Any]) -> None:
        self.engine, self.recording = engine, recording
        self.replaying, self.calls = bool(recording), 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self.replaying:
            exp = copy.deepcopy(self.recording[self.calls])
        else:
            exp = self.engine.generate(*args, **kwargs)
            self.recording.append(copy.deepcopy(exp))
        self.calls += 1
        return exp


def first_steps(build: Callable[[str], Any], *, replay: bool = False) -> dict[str, FirstSteps]:
    """``build(precision)`` -> a trainer; its run in fp32 and in bf16 (with ``replay``, an
    online trainer's bf16 run on the fp32 run's samples: :class:`ReplayEngine`)."""
    runs = {}
    recording: list[Any] = []
    for precision in ("fp32", "bf16"):
        trainer = build(precision)
        if replay:
            trainer.engine = ReplayEngine(trainer.engine, recording)
        with captured_gradients() as gradients:
            trainer.train()
        assert trainer.precision.name == precision
        runs[precision] = FirstSteps(
            read_metrics(trainer.run_dir.metrics_path), gradients, precision
        )
    return runs


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` (in float64)."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """In float64: a float32 dot product over ~1e8 entries is itself off by ~1e-2."""
    a, b = a.double(), b.double()
    return float(a.dot(b) / (a.norm() * b.norm()))


def parity(runs: dict[str, FirstSteps], loss: str = "loss") -> dict[str, float]:
    """The first step's loss and gradient of bf16 against fp32: relative loss error,
    relative gradient error and cosine, and the largest relative loss error of the later steps."""
    fp32, bf16 = runs["fp32"], runs["bf16"]
    losses32, losses16 = fp32.metric(loss), bf16.metric(loss)
    assert len(losses32) == len(losses16) >= 1
    g32, g16 = fp32.gradients[0], bf16.gradients[0]
    later = [abs(b - a) / abs(a) for a, b in zip(losses32[1:], losses16[1:], strict=True)]
    return {
        "loss": abs(losses16[0] - losses32[0]) / abs(losses32[0]),
        "loss_abs": abs(losses16[0] - losses32[0]),
        "later_loss_abs": max(
            (abs(b - a) for a, b in zip(losses32[1:], losses16[1:], strict=True)), default=0.0
        ),
        "grad": relative_error(g16, g32),
        "cosine": cosine(g16, g32),
        "later_loss": max(later, default=0.0),
    }
