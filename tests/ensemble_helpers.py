"""The tiny reward-model ensemble that the ensemble and the uncertainty-labelling tests train:
three members on the bundled task's preference pairs, through ``alignkit train rm-ensemble``."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.synthetic import write_task

CONFIG = """\
run_name: ens
output_dir: {out}
max_steps: {max_steps}
examples_per_device: 8
model:
  name: tiny
data:
  train_file: {data}/preference_train.jsonl
  eval_file: {data}/preference_heldout.jsonl
  max_length: 96
  max_eval_examples: 64
optim:
  lr: 3.0e-3
eval:
  every: {eval_every}
  examples_per_device: 32
logging:
  every: 10
  progress_bar: false
  plots: false
ensemble:
  members: 3
"""


def train_tiny_ensemble(root: Path, *, max_steps: int, eval_every: int | None) -> Path:
    """Write the task (seed 0) to ``root/data`` and train the ensemble into ``root/runs/ens``
    (evaluated every ``eval_every`` steps; None: at the end only); returns the run directory."""
    write_task(root / "data", seed=0)
    config = root / "ens.yaml"
    every = "null" if eval_every is None else eval_every
    config.write_text(
        CONFIG.format(out=root / "runs", data=root / "data", max_steps=max_steps, eval_every=every)
    )
    with pytest.raises(SystemExit) as info:
        main(["train", "rm-ensemble", "-c", str(config)])
    assert info.value.code in (0, None)
    return root / "runs" / "ens"
