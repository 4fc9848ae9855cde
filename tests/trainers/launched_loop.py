"""test_loop.py's two-process runs, made by one ``accelerate launch`` of this script.

``launched_loop.py OUTPUT_DIR`` trains, one run after the other in the same two processes:
``two`` (64 rows, 4 per process, 2 epochs: 16 steps); ``cut``, the same run killed in step 8
(after its step-6 checkpoint), whose state at the kill goes to ``cut-at-kill.json``; and ``cut``
resumed from other weights and RNG states than the ones it was killed with. The test runs the
one-process reference with :func:`train` in its own process.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from launch_helpers import SimulatedKill, end_launched_process, record_the_killed_run
from torch import nn

from alignkit.config import TrainConfig, load_config
from alignkit.trainers import Trainer

SETTINGS = (
    "examples_per_device=4",
    "epochs=2",
    "logging.every=1",
    "checkpoint.every=3",
    "optim.lr=1e-2",
    "logging.progress_bar=false",
    "logging.plots=false",
)


class Regressor(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class RegressionTrainer(Trainer):
    kill_at_step = 0

    def compute_loss(self, model, batch):
        if self.state.step + 1 == self.kill_at_step:
            raise SimulatedKill  # on every process, in the same step: no collective is left open
        prediction = model(batch["x"])
        return ((prediction - batch["y"]) ** 2).mean(), {}


def rows() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.randn(4, generator=generator)
    mask = torch.ones(3, dtype=torch.long)
    return [{"x": a, "y": b, "attention_mask": mask} for a, b in zip(x, y, strict=True)]


def train(*overrides: str, kill_at_step: int = 0, seed: int = 0) -> None:
    """One run: SETTINGS then `overrides`, on weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    config = load_config(TrainConfig, None, [*SETTINGS, *overrides])
    trainer = RegressionTrainer(config, Regressor(), rows())
    trainer.kill_at_step = kill_at_step
    trainer.train()


def main(output_dir: Path) -> None:
    train(f"output_dir={output_dir}", "run_name=two")
    rank = torch.distributed.get_rank()  # the trainer's accelerator joined the group
    cut = output_dir / "cut"
    with contextlib.suppress(SimulatedKill):
        train(f"output_dir={output_dir}", "run_name=cut", kill_at_step=8)
    record_the_killed_run(cut, output_dir / "cut-at-kill.json")
    # The resumed run starts from other weights and RNG states on each process: the
    # checkpoint must restore them all.
    train(f"output_dir={output_dir}", "run_name=cut", f"resume_from={cut}", seed=123 + rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_launched_process()
