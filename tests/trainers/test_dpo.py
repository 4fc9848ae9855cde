"""The DPO family on the tiny preset, starting from the session's SFT checkpoint (conftest).

Pins down: held-out preference accuracy goes from exactly chance (the policy is its own
reference) to >= 90%; every kind moves the held-out implicit-reward margin the right way; the
reference log-probs are computed once, cached in the run directory and read back on resume;
LoRA trains only the adapter and its reference is the adapter switched off.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.models import load_policy
from alignkit.models.forward import response_logps
from alignkit.ops.preference import dpo_loss
from alignkit.tracking import read_metrics
from alignkit.trainers.common import split_pairs
from alignkit.trainers.dpo import (
    REFERENCE_CACHE,
    DPOConfig,
    DPOTrainer,
    build_dpo_trainer,
    build_preference_trainer,
)
from alignkit.trainers.safe_dpo import SafeDPOConfig

DPO_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "lr",
    "grad_norm",
    "tokens_per_s",
}


class EvaluatedAtStart(DPOTrainer):
    """Evaluates once the reference log-probs exist, before the first optimizer step."""

    def on_train_begin(self) -> None:
        super().on_train_begin()
        self.model.eval()
        self.at_start = self.evaluate()
        self.model.train()


def dpo_config(run_settings, tmp_path: Path, name: str, model: Path, *overrides: str) -> DPOConfig:
    return load_config(
        DPOConfig,
        None,
        run_settings(
            tmp_path,
            name,
            f"model.name={model}",
            "examples_per_device=8",
            "optim.lr=1e-3",
            "dpo.beta=0.1",
            *overrides,
        ),
    )


def test_dpo_raises_heldout_accuracy_from_chance_to_90_percent(
    sft_run, task_files, head_of, run_settings, tmp_path, reference_passes
):
    config = dpo_config(
        run_settings,
        tmp_path,
        "dpo",
        sft_run.model_dir,
        f"data.train_file={head_of('preference_train', 160)}",
        f"data.eval_file={task_files['preference_heldout']}",
        "epochs=1",
        "logging.every=5",
    )
    trainer = build_preference_trainer(EvaluatedAtStart, config, "preference", extra_fields=[])
    summary = trainer.train()

    # Before any step the policy is the reference: every margin is exactly 0 and a tie counts
    # half, so accuracy is exactly chance and the loss exactly log 2.
    start = trainer.at_start
    assert start["eval/rewards/accuracies"] == 0.5
    assert start["eval/rewards/margins"] == 0.0
    assert start["eval/loss"] == pytest.approx(math.log(2), rel=1e-6)
    # 20 steps on 160 pairs; measured on the 288 held-out pairs: accuracy 1.0, margin ~5.
    after = summary["eval"]
    assert summary["step"] == 20
    assert after["eval/rewards/accuracies"] >= 0.9
    assert after["eval/rewards/margins"] > 1.0
    assert after["eval/loss"] < 0.5 * start["eval/loss"]
    records = read_metrics(config.run_dir / "metrics.jsonl")
    assert all(set(r) >= DPO_METRICS for r in records)
    # Measured: 0.318 (mean of steps 1-5) -> 0.030 (steps 16-20).
    assert records[-1]["loss"] < 0.2 * records[0]["loss"]
    # One reference pass per dataset, written to the run directory.
    assert reference_passes == [160, 288]
    cache = torch.load(config.run_dir / REFERENCE_CACHE, weights_only=True)
    assert cache["tables"]["train"].shape == (160, 2)
    assert cache["tables"]["eval"].shape == (288, 2)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("sigmoid", ()), ("ipo", ()), ("hinge", ()), ("robust", ("dpo.label_smoothing=0.1",))],
)
def test_each_dpo_kind_moves_the_heldout_margin_the_right_way(
    kind, extra, sft_run, head_of, run_settings, tmp_path
):
    config = dpo_config(
        run_settings,
        tmp_path,
        kind,
        sft_run.model_dir,
        f"data.train_file={head_of('preference_train', 80)}",
        f"data.eval_file={head_of('preference_heldout', 48)}",
        "max_steps=10",
        "logging.every=10",
        f"dpo.kind={kind}",
        *extra,
    )
    summary = build_dpo_trainer(config).train()
    # Starts at exactly 0 (policy = reference). Measured after 10 steps on 48 held-out pairs:
    # margin (accuracy) sigmoid 3.69 (1.0), ipo 0.49 (0.875), hinge 3.06 (1.0), robust 4.17 (1.0).
    margin = summary["eval"]["eval/rewards/margins"]
    assert margin > 0.3
    assert summary["eval"]["eval/rewards/accuracies"] >= 0.8
    if kind == "ipo":
        # IPO regresses h onto 1/(2 beta), i.e. the margin beta*h onto 0.5, instead of
        # pushing it up without bound like the logistic losses.
        assert margin < 1.0
    train = read_metrics(config.run_dir / "metrics.jsonl")[-1]
    assert train["rewards/margins"] > 0


def test_reference_logps_are_cached_and_not_recomputed_on_resume(
    sft_run, head_of, run_settings, tmp_path, reference_passes
):
    settings = (
        f"data.train_file={head_of('preference_train', 48)}",
        f"data.eval_file={head_of('preference_heldout', 16)}",
        "logging.every=1",
    )
    first = dpo_config(
        run_settings, tmp_path, "cached", sft_run.model_dir, *settings, "max_steps=3"
    )
    trainer = build_dpo_trainer(first)
    trainer.train()
    assert reference_passes == [48, 16]
    cache = torch.load(first.run_dir / REFERENCE_CACHE, weights_only=True)

    # The cached values are the initial (SFT) model's log-probs of each pair, in row order.
    reference, _ = load_policy(sft_run.model_dir)
    batch = trainer.collate_fn([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        chosen, rejected = split_pairs(response_logps(reference, batch))
    torch.testing.assert_close(
        cache["tables"]["train"][:8], torch.stack([chosen, rejected], -1), rtol=1e-5, atol=1e-4
    )

    resumed = dpo_config(
        run_settings,
        tmp_path,
        "ignored",
        sft_run.model_dir,
        *settings,
        "max_steps=6",
        f"resume_from={first.run_dir}",
    )
    build_dpo_trainer(resumed).train()
    assert reference_passes == [48, 16]  # read from reference_logps.pt, not recomputed
    assert [r["step"] for r in read_metrics(first.run_dir / "metrics.jsonl")] == list(range(1, 7))


def test_lora_dpo_trains_the_adapter_against_the_adapter_free_reference(
    sft_run, head_of, run_settings, tmp_path
):
    config = dpo_config(
        run_settings,
        tmp_path,
        "lora",
        sft_run.model_dir,
        f"data.train_file={head_of('preference_train', 48)}",
        f"data.eval_file={head_of('preference_heldout', 48)}",
        "model.lora={r: 8, alpha: 16}",
        "max_steps=6",
        "optim.lr=1e-2",
        "logging.every=1",
    )
    trainer = build_dpo_trainer(config)
    policy = trainer.model
    adapters = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    # A fresh adapter is a no-op (B = 0), so the policy would equal its reference either way.
    # Perturb B: the reference must still be the base model (adapter off), not this policy.
    with torch.no_grad():
        for name, param in adapters.items():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    batch = trainer.collate_fn([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        perturbed = torch.stack(split_pairs(response_logps(policy.eval(), batch)), -1)
    policy.train()
    base, _ = load_policy(sft_run.model_dir)
    with torch.no_grad():
        base_logps = torch.stack(split_pairs(response_logps(base, batch)), -1)
    assert (perturbed - base_logps).abs().max() > 0.5

    summary = trainer.train()

    cache = torch.load(config.run_dir / REFERENCE_CACHE, weights_only=True)
    torch.testing.assert_close(cache["tables"]["train"][:8], base_logps, rtol=1e-5, atol=1e-4)
    for name, param in policy.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name  # the base never moves
    # Measured: held-out margin 2.78, accuracy 1.0 after 6 steps.
    assert summary["eval"]["eval/rewards/margins"] > 0.5
    losses = [r["loss"] for r in read_metrics(config.run_dir / "metrics.jsonl")]
    # Measured: 1.15 at step 1 (the perturbed adapter) -> 0.038 at step 6.
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("kind", ["ipo", "hinge"])
def test_label_smoothing_on_a_loss_without_it_is_a_config_error(kind):
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(DPOConfig, None, [f"dpo.kind={kind}", "dpo.label_smoothing=0.1"])


def test_unknown_dpo_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="valid: sigmoid, ipo, hinge, robust"):
        load_config(DPOConfig, None, ["dpo.kind=sigmod"])


def test_nll_weight_adds_the_per_token_nll_of_the_chosen_response(
    sft_run, head_of, run_settings, tmp_path
):
    config = dpo_config(
        run_settings,
        tmp_path,
        "rpo",
        sft_run.model_dir,
        f"data.train_file={head_of('preference_train', 8)}",
        "dpo.nll_weight=0.5",
    )
    trainer = build_dpo_trainer(config)
    examples = [trainer.train_dataset[i] for i in range(4)]
    for example, (ref_chosen, ref_rejected) in zip(
        examples, [(-20.0, -25.0), (-30.0, -10.0), (-15.0, -15.0), (-40.0, -35.0)], strict=True
    ):
        example["ref_chosen_logp"], example["ref_rejected_logp"] = ref_chosen, ref_rejected
    batch = trainer.collate_fn(examples)
    loss, metrics = trainer.compute_loss(trainer.model, batch)

    with torch.no_grad():
        chosen, rejected = split_pairs(response_logps(trainer.model, batch))
    dpo, _, _ = dpo_loss(
        chosen, rejected, batch["ref_chosen_logp"], batch["ref_rejected_logp"], beta=0.1
    )
    # Token counts straight from the tokenised examples, not from the batch's masks.
    chosen_lengths = torch.tensor([float(len(e["chosen_ids"])) for e in examples])
    nll = -chosen / chosen_lengths
    torch.testing.assert_close(loss.detach(), (dpo + 0.5 * nll).mean())
    torch.testing.assert_close(metrics["nll_loss"], nll.mean())
    assert 0.5 < metrics["nll_loss"].item() < 10  # a trained model's per-token NLL, in nats


def test_nll_weight_keeps_the_chosen_log_prob_from_falling(
    sft_run, head_of, run_settings, tmp_path
):
    def run(name: str, *overrides: str) -> dict[str, float]:
        config = dpo_config(
            run_settings,
            tmp_path,
            name,
            sft_run.model_dir,
            f"data.train_file={head_of('preference_train', 80)}",
            f"data.eval_file={head_of('preference_heldout', 48)}",
            "max_steps=10",
            "logging.every=10",
            *overrides,
        )
        return build_dpo_trainer(config).train()["eval"]

    plain = run("plain")
    rpo = run("rpo", "dpo.nll_weight=1.0")
    # Measured on 48 held-out pairs after 10 steps: plain DPO widens the margin partly by
    # lowering the chosen response (implicit reward -0.79, i.e. -7.9 nats), RPO barely lowers
    # it (-0.11) and still separates the pairs (accuracy 0.94, margin 2.4).
    assert plain["eval/rewards/chosen"] < -0.4
    assert rpo["eval/rewards/chosen"] > plain["eval/rewards/chosen"] + 0.4
    assert rpo["eval/rewards/margins"] > 1.0
    assert rpo["eval/rewards/accuracies"] >= 0.85


def test_negative_nll_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="nll_weight"):
        load_config(DPOConfig, None, ["dpo.nll_weight=-1"])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_step_one_loss_is_the_squared_target_one_over_two_beta(
    beta, sft_run, head_of, run_settings, tmp_path
):
    # At step 1 the policy is its reference, h = 0, and IPO's loss (h - 1/(2 beta))^2 is
    # exactly 1/(4 beta^2): 25 for beta 0.1 (1/beta would give 100), 1 for beta 0.5.
    config = dpo_config(
        run_settings,
        tmp_path,
        f"ipo-{beta}",
        sft_run.model_dir,
        f"data.train_file={head_of('preference_train', 8)}",
        "dpo.kind=ipo",
        f"dpo.beta={beta}",
        "max_steps=1",
        "logging.every=1",
    )
    build_dpo_trainer(config).train()
    first = read_metrics(config.run_dir / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(1 / (2 * beta) ** 2, rel=1e-5)


class ShiftedReference(DPOTrainer):
    """The reference's chosen log-probs lowered by 3 nats, so that at step 1 the summed
    log-ratio difference is exactly h = 3 on every pair (the policy is still the reference)."""

    def on_train_begin(self) -> None:
        super().on_train_begin()
        for example in self.train_dataset:
            example["ref_chosen_logp"] -= 3.0


@pytest.mark.parametrize("length_normalize", [True, False])
def test_length_normalized_ipo_step_one_loss_uses_per_token_log_ratios(
    length_normalize, sft_run, head_of, run_settings, tmp_path
):
    # With length_normalize, h = 3 / |chosen| (a per-token log-ratio, as TRL's IPO); without
    # it, h = 3. IPO's step-1 loss is the batch mean of (h - 1/(2 beta))^2.
    beta = 0.5
    config = dpo_config(
        run_settings,
        tmp_path,
        f"ipo-normalized-{length_normalize}",
        sft_run.model_dir,
        f"data.train_file={head_of('preference_train', 8)}",
        "dpo.kind=ipo",
        f"dpo.beta={beta}",
        f"dpo.length_normalize={str(length_normalize).lower()}",
        "max_steps=1",
        "logging.every=1",
    )
    trainer = build_preference_trainer(ShiftedReference, config, "preference", extra_fields=[])
    lengths = [len(example["chosen_ids"]) for example in trainer.train_dataset]
    trainer.train()
    first = read_metrics(config.run_dir / "metrics.jsonl")[0]
    summed = (3.0 - 1 / (2 * beta)) ** 2
    per_token = sum((3.0 / n - 1 / (2 * beta)) ** 2 for n in lengths) / len(lengths)
    assert min(lengths) > 3  # per-token h < 1, so the two forms are far apart
    expected, other = (per_token, summed) if length_normalize else (summed, per_token)
    assert first["loss"] == pytest.approx(expected, rel=1e-4)
    assert abs(first["loss"] - other) > 0.5


def test_length_normalize_is_refused_by_safe_dpo():
    with pytest.raises(ConfigError, match="length_normalize is not supported by Safe-DPO"):
        load_config(SafeDPOConfig, None, ["dpo.length_normalize=true"])


def _closed_form_reference_free_loss(kind: str, chosen, rejected, chosen_n, rejected_n, beta):
    """SimPO / ORPO written out from the papers on per-token mean log-probs."""
    avg_c, avg_r = chosen / chosen_n, rejected / rejected_n
    if kind == "simpo":
        return -torch.nn.functional.logsigmoid(beta * (avg_c - avg_r) - 0.5)
    p_c, p_r = avg_c.exp(), avg_r.exp()
    log_odds_ratio = torch.log(p_c / (1 - p_c)) - torch.log(p_r / (1 - p_r))
    return -avg_c - beta * torch.nn.functional.logsigmoid(log_odds_ratio)


@pytest.mark.parametrize(("kind", "beta"), [("simpo", 2.0), ("orpo", 0.1)])
def test_reference_free_kinds_skip_the_reference_and_lower_their_loss(
    kind, beta, sft_run, head_of, run_settings, tmp_path, reference_passes
):
    config = dpo_config(
        run_settings,
        tmp_path,
        kind,
        sft_run.model_dir,
        f"data.train_file={head_of('preference_train', 8)}",
        f"dpo.kind={kind}",
        f"dpo.beta={beta}",
        "max_steps=3",
        "logging.every=1",
    )
    trainer = build_dpo_trainer(config)
    examples = list(trainer.train_dataset)
    batch = trainer.collate_fn(examples)
    with torch.no_grad():
        chosen, rejected = split_pairs(response_logps(trainer.model, batch))
    chosen_n = torch.tensor([float(len(e["chosen_ids"])) for e in examples])
    rejected_n = torch.tensor([float(len(e["rejected_ids"])) for e in examples])
    expected = _closed_form_reference_free_loss(kind, chosen, rejected, chosen_n, rejected_n, beta)
    trainer.train()

    # No reference pass ran and nothing was cached; the examples carry no reference values.
    assert reference_passes == []
    assert not (config.run_dir / REFERENCE_CACHE).exists()
    assert all("ref_chosen_logp" not in e for e in trainer.train_dataset)
    records = read_metrics(config.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    # Step 1 (one batch of all 8 pairs, the initial policy) is the paper's closed form, and
    # three steps on the same pairs lower it.
    assert records[0]["loss"] == pytest.approx(expected.mean().item(), rel=1e-4)
    assert records[-1]["loss"] < records[0]["loss"]
    # SimPO widens the margin of mean log-probs; ORPO, dominated by its NLL term at lambda 0.1
    # (measured: loss 2.04 -> 1.46 while the margin went 0.60 -> 0.55), raises the chosen
    # response's log-prob.
    watched = "rewards/margins" if kind == "simpo" else "logps/chosen"
    assert records[-1][watched] > records[0][watched]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["dpo.kind=simpo", "reference=some/model"], "uses no reference model"),
        (["dpo.kind=orpo", "dpo.simpo_gamma=0.5"], "dpo.simpo_gamma: a margin gamma"),
        (["dpo.kind=simpo", "dpo.simpo_gamma=-1"], "gamma must be >= 0"),
        (["dpo.kind=simpo", "dpo.label_smoothing=0.1"], "label_smoothing is not defined"),
        (["dpo.kind=sigmoid", "dpo.simpo_gamma=0.5"], "simpo_gamma is not defined"),
    ],
)
def test_reference_free_settings_are_checked_with_the_config(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DPOConfig, None, overrides)


def test_safe_dpo_refuses_a_reference_free_kind():
    with pytest.raises(ConfigError, match="simpo is reference-free"):
        load_config(SafeDPOConfig, None, ["dpo.kind=simpo"])
