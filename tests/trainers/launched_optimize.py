"""test_optimize.py's two-process run, made by ``accelerate launch`` of this script.

``launched_optimize.py OUTPUT_DIR`` trains run ``two``: a weighted regression whose rows carry
ragged loss units, 4 rows per process. The test runs the one-process references with
:func:`train` in its own process.
"""

from __future__ import annotations

import sys

import torch
from launch_helpers import end_launched_process
from torch import nn

from alignkit.config import TrainConfig, load_config
from alignkit.trainers import Trainer

SETTINGS = (
    "epochs=2",
    "logging.every=1",
    "optim.lr=0.2",
    "logging.progress_bar=false",
    "logging.plots=false",
)


class WeightedRegression(Trainer):
    """Loss = sum(w * err^2) / sum(w) per micro-batch; its units are sum(w)."""

    def compute_loss(self, model, batch):
        error = (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2
        return (batch["w"] * error).sum() / batch["w"].sum(), {}

    def loss_units(self, batch):
        return batch["w"].sum()


def rows() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    y = x @ torch.randn(4, generator=generator)
    w = torch.randint(1, 20, (32,), generator=generator).float()
    return [{"x": a, "y": b, "w": c} for a, b, c in zip(x, y, w, strict=True)]


def train(*overrides: str) -> None:
    torch.manual_seed(0)
    config = load_config(TrainConfig, None, [*SETTINGS, *overrides])
    WeightedRegression(config, nn.Linear(4, 1), rows()).train()


if __name__ == "__main__":
    train(f"output_dir={sys.argv[1]}", "run_name=two", "examples_per_device=4")
    end_launched_process()
