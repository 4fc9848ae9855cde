"""Every trainer's pair accuracy is ``ops.stats.pairwise_accuracy`` (a tie counts as half), and
a reward-model loss registered from outside is selected by the ``loss`` config field."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.ops.preference import REWARD_LOSSES, register_reward_loss
from alignkit.trainers.dpo import preference_metrics
from alignkit.trainers.reward import RewardConfig, build_reward_trainer

# Chosen above, equal to, and below the rejected score: accuracy (1 + 0.5 + 0) / 3.
CHOSEN = torch.tensor([2.0, 1.0, -1.0])
REJECTED = torch.tensor([1.0, 1.0, 0.0])


def _reward_trainer(tmp_path, head_of, *overrides: str):
    kind_file = "safety_train" if "kind=cost" in overrides else "preference_train"
    config = load_config(
        RewardConfig,
        None,
        [
            f"data.train_file={head_of(kind_file, 8)}",
            f"output_dir={tmp_path / 'runs'}",
            "logging.progress_bar=false",
            "logging.plots=false",
            *overrides,
        ],
    )
    return build_reward_trainer(config)


def test_dpo_accuracy_counts_a_tie_as_half():
    metrics = preference_metrics(CHOSEN, REJECTED, CHOSEN, REJECTED)
    assert metrics["rewards/accuracies"].item() == pytest.approx(0.5)


def test_reward_and_cost_accuracy_count_a_tie_as_half(tmp_path, head_of):
    trainer = _reward_trainer(tmp_path, head_of, "use_margin=false")
    _, metrics = trainer.loss_and_metrics({"chosen": CHOSEN, "rejected": REJECTED})
    assert metrics["accuracy"].item() == pytest.approx(0.5)

    trainer = _reward_trainer(tmp_path, head_of, "kind=cost", "run_name=cost")
    # Chosen safer in pairs 0-1 (the rejected must cost more), rejected safer in pair 2, equal
    # safety in pair 3 (no order: left out). Pairs 0 and 2 right, pair 1 a tie.
    pairs = {
        "chosen": torch.tensor([0.0, 1.0, 3.0, 5.0]),
        "rejected": torch.tensor([1.0, 1.0, 0.0, -5.0]),
        "chosen_safety": torch.tensor([1.0, 1.0, 0.0, 0.0]),
        "rejected_safety": torch.tensor([0.0, 0.0, 1.0, 0.0]),
        "chosen_is_safe": torch.ones(4),
        "rejected_is_safe": torch.ones(4),
    }
    _, metrics = trainer.loss_and_metrics(pairs)
    assert metrics["accuracy"].item() == pytest.approx((1.0 + 0.5 + 1.0) / 3)


def test_a_reward_loss_registered_outside_is_selected_by_the_loss_field(tmp_path, head_of):
    with pytest.raises(ConfigError, match=r"loss: unknown reward loss 'btt'.*'bt'"):
        load_config(RewardConfig, None, ["loss=btt"])

    @register_reward_loss("test-exponential")
    def exponential(diff: torch.Tensor, margin) -> torch.Tensor:
        return torch.exp(-diff)

    try:
        trainer = _reward_trainer(tmp_path, head_of, "loss=test-exponential", "use_margin=false")
        loss, _ = trainer.loss_and_metrics({"chosen": CHOSEN, "rejected": REJECTED})
    finally:
        REWARD_LOSSES.unregister("test-exponential")
    assert loss.item() == pytest.approx((math.exp(-1.0) + 1.0 + math.exp(1.0)) / 3, rel=1e-6)
