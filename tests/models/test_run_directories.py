"""A run directory wherever a model is named: its best checkpoint (early stopping) while kept,
else its final one; a checkpoint directory its model; said once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import alignkit.models.loading as loading
from alignkit.errors import ModelError
from alignkit.models import load_reward_model
from alignkit.models.loading import resolve_model, resolve_run_model


def _checkpoint(run: Path, step: int) -> Path:
    model = run / "checkpoints" / f"step-{step}" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model.parent / "trainer_state.pt").write_bytes(b"")
    return model


def test_a_run_is_its_best_checkpoint_else_its_final_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first, last = _checkpoint(run, 10), _checkpoint(run, 20)
    assert resolve_run_model(run) == (str(last), f"{run}: using its newest checkpoint, {last}")
    (run / "summary.json").write_text(json.dumps({"last_checkpoint": str(last.parent)}))
    assert resolve_run_model(run)[1] == f"{run}: using its final checkpoint, {last}"
    best = {"metric": "eval/loss", "value": 0.3, "step": 10}
    (run / "summary.json").write_text(
        json.dumps({"last_checkpoint": str(last.parent), "best": best})
    )
    path, note = resolve_run_model(run)
    assert path == str(first) and "best checkpoint (eval/loss at step 10)" in note
    assert resolve_run_model(first.parent)[0] == str(first)  # a checkpoint: its model
    assert resolve_run_model(last) == (str(last), None)  # a model directory as it is
    assert resolve_run_model("tiny") == ("tiny", None)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelError, match="run directory without a complete checkpoint"):
        resolve_model(tmp_path / "empty")


def test_resolving_a_run_says_so_once(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(loading, "_SAID", set())
    run = tmp_path / "run"
    _checkpoint(run, 3)
    with caplog.at_level(logging.WARNING, logger="alignkit.models"):
        for _ in range(2):
            assert resolve_model(run).kind == "directory"
    assert [r.getMessage() for r in caplog.records] == [
        f"{run}: using its newest checkpoint, {run}/checkpoints/step-3/model"
    ]


def test_a_reward_model_run_restores_its_saved_head(tmp_path: Path) -> None:
    model, tokenizer = load_reward_model("tiny", seed=7)
    run = tmp_path / "rm"
    saved = run / "checkpoints" / "step-4" / "model"
    model.save_pretrained(saved, tokenizer=tokenizer)
    (saved.parent / "trainer_state.pt").write_bytes(b"")
    restored, _ = load_reward_model(run)  # a fresh head before: the run was a backbone
    for (name, mine), theirs in zip(
        model.state_dict().items(), restored.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), name
