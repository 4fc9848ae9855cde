"""Training with ``model.packed`` on and off gives the same run (tiny preset, a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

import alignkit.models.forward as forward_module
import alignkit.models.reward as reward_module
from alignkit.config import load_config
from alignkit.tracking import read_metrics
from alignkit.trainers.dpo import DPOConfig, build_dpo_trainer
from alignkit.trainers.reward import RewardConfig, build_reward_trainer

STEPS = 4


def _settings(tmp_path: Path, name: str, train: Path, packed: bool) -> list[str]:
    return [
        f"output_dir={tmp_path}",
        f"run_name={name}",
        f"data.train_file={train}",
        "data.max_length=128",
        "model.name=tiny",
        f"model.packed={str(packed).lower()}",
        "examples_per_device=8",
        f"max_steps={STEPS}",
        "optim.lr=3e-3",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
    ]


def _count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _losses_match(runs: dict[bool, list[dict]], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in runs[True]] == list(range(1, STEPS + 1))
    for on, off in zip(runs[True], runs[False], strict=True):
        for key in keys:
            assert on[key] == pytest.approx(off[key], rel=1e-5, abs=1e-5), key


def test_dpo_trains_identically_with_and_without_packing(
    head_of, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed_calls = _count_calls(monkeypatch, forward_module, "_packed_token_logprobs")
    train = head_of("preference_train", 8 * STEPS)
    runs = {}
    for packed in (True, False):
        config = load_config(DPOConfig, None, _settings(tmp_path, f"dpo-{packed}", train, packed))
        build_dpo_trainer(config).train()
        runs[packed] = read_metrics(config.run_dir / "metrics.jsonl")
        if packed:  # the reference pass (4 batches) and the 4 steps ran packed
            assert len(packed_calls) == 2 * STEPS
    assert len(packed_calls) == 2 * STEPS  # and the padded run never did
    _losses_match(runs, ("loss", "rewards/margins", "logps/chosen", "logps/rejected"))
    # Training moved the policy: the margins are no longer exactly 0 after step 1.
    assert abs(runs[True][-1]["rewards/margins"]) > 1e-3


def test_reward_model_trains_identically_with_and_without_packing(
    head_of, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed_calls = _count_calls(monkeypatch, reward_module, "pack_rows")
    train = head_of("preference_train", 8 * STEPS)
    runs = {}
    for packed in (True, False):
        config = load_config(RewardConfig, None, _settings(tmp_path, f"rm-{packed}", train, packed))
        build_reward_trainer(config).train()
        runs[packed] = read_metrics(config.run_dir / "metrics.jsonl")
    assert len(packed_calls) == STEPS
    _losses_match(runs, ("loss", "rewards/chosen", "rewards/rejected"))
    assert runs[True][-1]["loss"] != runs[True][0]["loss"]
