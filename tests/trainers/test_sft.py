"""SFT on the tiny preset and the synthetic task (the session's one SFT run, see conftest).

Pins down: held-out loss falls by a stated amount from the untrained model's; the run
directory holds what DESIGN.md lists and the checkpoint reloads to the same held-out loss;
greedy answers learn the demonstrations; conversational rows train too.
"""

from __future__ import annotations

import itertools

import pytest

from alignkit.config import load_config
from alignkit.models import load_policy
from alignkit.tracking import read_metrics
from alignkit.trainers.sft import SFTConfig, build_sft_trainer


def test_sft_lowers_heldout_loss_far_below_the_untrained_model(sft_run):
    # Measured (1 thread): untrained 6.95 (~ln 1024, uniform over the vocabulary), held-out
    # eval/loss 1.79, 0.49, 0.25, 0.231 after epochs 3, 6, 9, 12.
    evals = [r["eval/loss"] for r in sft_run.records if "eval/loss" in r]
    assert [r["step"] for r in sft_run.records if "eval/loss" in r] == [42, 84, 126, 168]
    assert sft_run.untrained_eval_loss > 6.0
    assert all(later < earlier for earlier, later in itertools.pairwise(evals))
    assert evals[-1] < 0.05 * sft_run.untrained_eval_loss
    assert evals[-1] < 0.2 * evals[0]
    train = [r["loss"] for r in sft_run.records if "loss" in r]
    assert train[-1] < 0.05 * train[0]  # measured 6.04 (epoch 1) -> 0.121
    assert sft_run.summary["eval"]["eval/loss"] == evals[-1]


def test_sft_run_directory_and_checkpoint(sft_run):
    root = sft_run.run_dir
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "summary.json", "plots"} <= {
        p.name for p in root.iterdir()
    }
    assert load_config(SFTConfig, root / "config.yaml") == sft_run.config
    assert sft_run.summary["step"] == 168 and sft_run.summary["stop_reason"] == "epochs"
    model_dir = root / "checkpoints" / "step-168" / "model"
    assert sft_run.model_dir == model_dir
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    records = read_metrics(root / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(14, 169, 14))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= set(r) for r in records)
    assert {"loss.png", "lr.png", "grad_norm.png"} <= {p.name for p in (root / "plots").iterdir()}
    # The checkpoint is the trained model: reloaded, it scores the logged held-out loss.
    reloaded, _ = load_policy(model_dir)
    assert sft_run.heldout_loss(reloaded) == pytest.approx(
        sft_run.summary["eval"]["eval/loss"], rel=1e-5
    )


def test_sft_model_answers_held_out_prompts_like_its_demonstrations(sft_run, sft_judged):
    # Benign demonstrations are always helpful; 60% of harmful ones comply. Measured: benign
    # helpfulness 0.85, unsafe rate 0.50 on the 36 harmful held-out prompts (untrained: 0.0).
    metrics = sft_judged.metrics
    assert metrics["helpfulness_benign"] >= 0.75
    assert 0.2 <= metrics["unsafe_rate"] <= 0.8


def test_sft_trains_on_conversational_rows(task_files, run_settings, tmp_path):
    config = load_config(
        SFTConfig,
        None,
        run_settings(
            tmp_path,
            "chat",
            f"data.train_file={task_files['sft_messages_train']}",
            "max_steps=12",
            "examples_per_device=16",
            "optim.lr=5e-3",
            "logging.every=1",
        ),
    )
    build_sft_trainer(config).train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "chat" / "metrics.jsonl")]
    # Measured: 6.95 -> 5.47 in 12 steps.
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 1.0


def test_data_subsets_shrink_the_datasets_and_the_epoch(task_files, run_settings, tmp_path):
    config = load_config(
        SFTConfig,
        None,
        run_settings(
            tmp_path,
            "subset",
            f"data.train_file={task_files['sft_train']}",
            f"data.eval_file={task_files['sft_heldout']}",
            "data.max_train_examples=32",
            "data.max_eval_examples=8",
            "examples_per_device=16",
        ),
    )
    trainer = build_sft_trainer(config)
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (32, 8)
    assert trainer.train()["step"] == 2  # one epoch of 32 rows at 16 per step
