"""Kinds registered from outside the package are selected by name, with no other edit.

A DPO loss registered in this module trains through the DPO trainer (``dpo.kind``); an
advantage estimator registered here runs through the estimator dispatcher with its declared
inputs (the online trainer is not built yet).
"""

from __future__ import annotations

import pytest
import torch

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.ops.advantages import (
    ADVANTAGE_ESTIMATORS,
    get_advantage_estimator,
    register_advantage_estimator,
)
from alignkit.ops.preference import DPO_LOSSES, register_dpo_loss
from alignkit.tracking import read_metrics
from alignkit.trainers.dpo import DPOConfig, build_dpo_trainer


def test_a_dpo_loss_registered_outside_trains_by_name(head_of, run_settings, tmp_path):
    seen: list[torch.Tensor] = []

    @register_dpo_loss("test-quadratic")
    def quadratic(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
        if label_smoothing != 0.0:
            raise ValueError("label_smoothing is not defined for test-quadratic")
        seen.append(h.detach().clone())
        return (1.0 - beta * h).square()

    try:
        with pytest.raises(ConfigError, match=r"dpo\.label_smoothing"):
            load_config(DPOConfig, None, ["dpo.kind=test-quadratic", "dpo.label_smoothing=0.1"])
        config = load_config(
            DPOConfig,
            None,
            run_settings(
                tmp_path,
                "plugin-dpo",
                "model.name=tiny",
                f"data.train_file={head_of('preference_train', 16)}",
                "examples_per_device=8",
                "epochs=1",
                "optim.lr=1e-2",
                "dpo.kind=test-quadratic",
                "dpo.beta=0.5",
                "logging.every=1",
            ),
        )
        summary = build_dpo_trainer(config).train()
    finally:
        DPO_LOSSES.unregister("test-quadratic")
    with pytest.raises(ConfigError, match=r"dpo\.kind: unknown DPO loss 'test-quadratic'"):
        load_config(DPOConfig, None, ["dpo.kind=test-quadratic"])

    assert summary["step"] == 2
    records = read_metrics(config.run_dir / "metrics.jsonl")
    losses = [record["loss"] for record in records]
    # Step 1: the policy is its own reference, every h is 0 and the loss 1. (0 to float
    # round-off: the reference pass packs the pairs into other batches than training does.)
    training_calls = [h for h in seen if h.numel() == 8]
    assert training_calls[0].abs().max().item() < 1e-4
    assert losses[0] == pytest.approx(1.0, abs=1e-4)
    # Step 2 saw the updated policy: h moved, and the logged loss is this function's value.
    second = training_calls[1]
    assert second.abs().max().item() > 1e-4
    assert losses[1] == pytest.approx((1.0 - 0.5 * second).square().mean().item(), rel=1e-5)


def test_an_advantage_estimator_registered_outside_runs_through_the_dispatcher():
    @register_advantage_estimator("test-leave-out-max", needs=("group_index",))
    def leave_out_max(*, token_rewards, mask, group_index):
        # Baseline = the best score of the group: only the best sample gets advantage 0.
        scores = (token_rewards * mask).sum(dim=1)
        best = torch.full((int(group_index.max()) + 1,), -torch.inf).scatter_reduce(
            0, group_index, scores, "amax"
        )
        advantages = (scores - best[group_index])[:, None] * mask
        return advantages, advantages

    try:
        mask = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 1]])
        token_rewards = torch.zeros(4, 3)
        token_rewards[:, -1] = torch.tensor([1.0, 5.0, 2.0, 4.0])  # row 1: reward on padding
        token_rewards[1, 1] = 3.0
        estimator = get_advantage_estimator("test-leave-out-max")
        advantages, _ = estimator(
            token_rewards=token_rewards, mask=mask, group_index=torch.tensor([0, 0, 1, 1])
        )
        # Scores 1, 3 (the 5 sits on padding), 2, 4; group maxima 3 and 4.
        expected = torch.tensor([-2.0, 0.0, -2.0, 0.0])[:, None] * mask
        torch.testing.assert_close(advantages, expected)
        with pytest.raises(ValueError, match="'test-leave-out-max' needs group_index"):
            estimator(token_rewards=token_rewards, mask=mask)
    finally:
        ADVANTAGE_ESTIMATORS.unregister("test-leave-out-max")
