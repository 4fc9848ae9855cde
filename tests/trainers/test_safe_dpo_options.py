"""Safe-DPO's options, each through the trainer's loss on one batch with set reference
log-probs: ``normalize`` (divide by 1 + lambda or not) and ``lambda.preference`` (which
preference J_C reads: the policy's log-ratio or the implicit reward)."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import load_config
from alignkit.models.forward import response_logps
from alignkit.trainers.common import split_pairs
from alignkit.trainers.safe_dpo import SafeDPOConfig, build_safe_dpo_trainer

#: Reference log-probs chosen so that the implicit reward and the raw log-prob order disagree.
REFERENCE = [(-5.0, -200.0), (-200.0, -5.0), (-5.0, -200.0), (-200.0, -5.0)]
#: Safety scores (chosen, rejected) of the four pairs: every pair has an order.
SAFETY = [(1.0, -1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -1.0)]


def batch_and_trainer(sft_run, head_of, run_settings, tmp_path, *overrides):
    cfg = load_config(
        SafeDPOConfig,
        None,
        run_settings(
            tmp_path,
            "safe",
            f"model.name={sft_run.model_dir}",
            f"data.train_file={head_of('safety_flat_train', 16)}",
            "lambda.init=2.0",
            *overrides,
        ),
    )
    trainer = build_safe_dpo_trainer(cfg)
    examples = [trainer.train_dataset[i] for i in range(4)]
    for example, (chosen, rejected), (safe_c, safe_r) in zip(
        examples, REFERENCE, SAFETY, strict=True
    ):
        example["ref_chosen_logp"], example["ref_rejected_logp"] = chosen, rejected
        example["chosen_safety"], example["rejected_safety"] = safe_c, safe_r
    trainer.model.eval()
    return trainer, trainer.collate_fn(examples)


@pytest.mark.parametrize("normalize", [True, False])
def test_normalize_divides_by_one_plus_lambda_only_when_set(
    normalize, sft_run, head_of, run_settings, tmp_path
):
    trainer, batch = batch_and_trainer(
        sft_run, head_of, run_settings, tmp_path, f"normalize={str(normalize).lower()}"
    )
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(trainer.model, batch)
    total = metrics["loss_H"] + 2.0 * metrics["loss_S"]  # lambda = 2
    expected = total / 3.0 if normalize else total
    torch.testing.assert_close(loss, expected)
    assert abs(total.item() / 3.0 - total.item()) > 0.1  # the two settings differ here


@pytest.mark.parametrize("preference", ["log_ratio", "implicit_reward"])
def test_lambda_preference_chooses_what_j_c_reads(
    preference, sft_run, head_of, run_settings, tmp_path
):
    trainer, batch = batch_and_trainer(
        sft_run, head_of, run_settings, tmp_path, f"lambda.preference={preference}"
    )
    with torch.no_grad():
        _, metrics = trainer.compute_loss(trainer.model, batch)
        chosen, rejected = split_pairs(response_logps(trainer.model, batch))
        raw_chosen, raw_rejected = chosen, rejected
    if preference == "implicit_reward":
        chosen = chosen - batch["ref_chosen_logp"]
        rejected = rejected - batch["ref_rejected_logp"]
    delta_s = batch["chosen_safety"] - batch["rejected_safety"]
    # J_C = -mean(sign(preference margin) * delta_S), seed 000's estimate, written out.
    expected = -(torch.sign(chosen - rejected) * delta_s).mean()
    torch.testing.assert_close(metrics["J_C_batch"], expected.float())
    # The references above make the two settings disagree on this batch.
    log_ratio_j_c = -(torch.sign(raw_chosen - raw_rejected) * delta_s).mean()
    implicit = (raw_chosen - batch["ref_chosen_logp"]) - (raw_rejected - batch["ref_rejected_logp"])
    assert abs(log_ratio_j_c - (-(torch.sign(implicit) * delta_s).mean())) > 0.1
