"""Shared, expensive things of the trainer tests: the synthetic task files and ONE SFT run.

Every DPO and Safe-DPO test starts from the same SFT checkpoint (the quickstart's recipe on
the tiny preset: 12 epochs, lr 5e-3, 16 rows per step, cosine), so it is trained once per
session (about 10 s on one CPU thread).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from online_helpers import SORT_SFT_RECIPE
from torch.utils.data import DataLoader

import alignkit.trainers.dpo as dpo_module
from alignkit.config import load_config
from alignkit.data.synthetic import SyntheticTask, write_task, write_verifiable_tasks
from alignkit.eval import evaluate_synthetic_task
from alignkit.eval.task import TaskEvaluation
from alignkit.models import load_policy
from alignkit.rollout import SamplingConfig
from alignkit.tracking import read_metrics
from alignkit.trainers.sft import SFTConfig, SFTTrainer, build_sft_trainer, train_sft

#: Every prompt + answer of the task fits (prompts < 20 words, answers < 30).
MAX_LENGTH = 128
#: The quickstart's SFT recipe for the tiny preset: 224 rows / 16 = 14 steps per epoch.
SFT_RECIPE = (
    "epochs=12",
    "examples_per_device=16",
    "optim.lr=5e-3",
    "optim.schedule=cosine",
    "optim.warmup_ratio=0.05",
)
SFT_STEPS = 12 * 14
#: Greedy decoding as the quickstart judges it.
GENERATION = SamplingConfig(max_new_tokens=40, temperature=0.0)

RunSettings = Callable[..., list[str]]


def _run_settings(output_dir: Path, name: str, *overrides: str) -> list[str]:
    return [
        f"output_dir={output_dir}",
        f"run_name={name}",
        "logging.progress_bar=false",
        "logging.plots=false",
        f"data.max_length={MAX_LENGTH}",
        *overrides,
    ]


@pytest.fixture(scope="session")
def run_settings() -> RunSettings:
    """``run_settings(output_dir, name, *overrides)``: the overrides every test run shares
    (quiet, no plots unless a test turns them on, max_length 128), then the test's own."""
    return _run_settings


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic task (seed 0) as JSONL: ``{"<kind>_<split>": path}``.

    Sizes: sft 224 train / 96 held-out rows; preference, safety (PKU format) and
    safety_flat 672 train / 288 held-out pairs.
    """
    return write_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="session")
def head_of(
    task_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, int], Path]:
    """``head_of("preference_train", 80)``: a file with the first 80 rows of that task file
    (rows are shuffled by prompt, so a head mixes categories), for short runs."""
    folder = tmp_path_factory.mktemp("heads")
    made: dict[tuple[str, int], Path] = {}

    def head(kind: str, rows: int) -> Path:
        if (kind, rows) not in made:
            lines = task_files[kind].read_text(encoding="utf-8").splitlines(keepends=True)
            assert len(lines) >= rows, f"{kind} has only {len(lines)} rows"
            path = folder / f"{kind}_{rows}.jsonl"
            path.write_text("".join(lines[:rows]), encoding="utf-8")
            made[kind, rows] = path
        return made[kind, rows]

    return head


@pytest.fixture
def reference_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the per-example passes of DPO's reference (one per dataset: train, eval): the
    size of each dataset passed, in order."""
    calls: list[int] = []
    original = dpo_module.gather_per_example

    def counting(trainer, dataset, compute, width):
        calls.append(len(dataset))
        return original(trainer, dataset, compute, width)

    monkeypatch.setattr(dpo_module, "gather_per_example", counting)
    return calls


@dataclass(frozen=True)
class SFTRun:
    config: SFTConfig
    trainer: SFTTrainer
    summary: dict[str, Any]
    untrained_eval_loss: float
    records: list[dict[str, Any]]

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def model_dir(self) -> Path:
        """The final checkpoint's model: what DPO and Safe-DPO start from."""
        return Path(self.summary["last_checkpoint"]) / "model"

    def heldout_loss(self, model: torch.nn.Module) -> float:
        return heldout_loss(self.trainer, model)


@torch.no_grad()
def heldout_loss(trainer: SFTTrainer, model: torch.nn.Module) -> float:
    """Mean per-batch SFT loss on the trainer's eval set, batched as the loop evaluates."""
    loader = DataLoader(
        trainer.eval_dataset,
        batch_size=trainer.config.eval.examples_per_device,
        collate_fn=trainer.collate_fn,
    )
    was_training = model.training
    model.eval()
    losses = [float(trainer.compute_loss(model, batch)[0]) for batch in loader]
    model.train(was_training)
    return sum(losses) / len(losses)


@pytest.fixture(scope="session")
def sft_run(task_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> SFTRun:
    """SFT on sft_train (224 rows) with held-out evaluation every 3 epochs, plots on."""
    config = load_config(
        SFTConfig,
        None,
        _run_settings(
            tmp_path_factory.mktemp("runs"),
            "sft",
            f"data.train_file={task_files['sft_train']}",
            f"data.eval_file={task_files['sft_heldout']}",
            *SFT_RECIPE,
            "eval.every=42",
            "logging.every=14",
            "logging.plots=true",
        ),
    )
    trainer = build_sft_trainer(config)
    untrained = heldout_loss(trainer, trainer.model)
    summary = trainer.train()
    return SFTRun(
        config, trainer, summary, untrained, read_metrics(config.run_dir / "metrics.jsonl")
    )


@pytest.fixture(scope="session")
def heldout_prompts() -> list[str]:
    """The 96 held-out prompts (unseen phrasings): 60 benign, 36 harmful."""
    return SyntheticTask(seed=0).prompts("heldout")


@pytest.fixture(scope="session")
def sft_judged(sft_run: SFTRun, heldout_prompts: list[str]) -> TaskEvaluation:
    """The SFT model's greedy answers to the held-out prompts, judged."""
    model, tokenizer = load_policy(sft_run.model_dir)
    return evaluate_synthetic_task(model, tokenizer, heldout_prompts, GENERATION)


def judge(model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> TaskEvaluation:
    return evaluate_synthetic_task(model, tokenizer, prompts, GENERATION)


@pytest.fixture(scope="session")
def judge_generations() -> Callable[[torch.nn.Module, Any, list[str]], TaskEvaluation]:
    """``judge_generations(model, tokenizer, prompts)``: greedy answers, judged."""
    return judge


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def jsonl_rows() -> Callable[[Path], list[dict[str, Any]]]:
    return read_jsonl


@pytest.fixture(scope="session")
def sort_task(tmp_path_factory) -> dict[str, Path]:
    """The sorting task's files and its SFT warm-up model (examples/sft_sort.yaml's recipe,
    about 10 s on one thread)."""
    root = tmp_path_factory.mktemp("online")
    paths = write_verifiable_tasks(root / "data")
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"output_dir={root}",
            "run_name=sft_sort",
            "model.name=tiny",
            f"data.train_file={paths['sort_sft']}",
            "data.max_length=32",
            *SORT_SFT_RECIPE,
        ],
    )
    summary = train_sft(cfg)
    model = Path(summary["last_checkpoint"]) / "model"
    return {"model": model, "root": root, **paths}
