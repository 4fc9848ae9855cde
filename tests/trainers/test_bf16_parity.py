"""Every trainer's first steps in bf16 against fp32 on the tiny preset, the engine's bf16
log-probs against the trainer's, and bf16 learning.

Each parity test runs the same trainer twice from the same weights and data, ``precision=fp32``
then ``precision=bf16`` (autocast, float32 master weights), without gradient clipping, and
compares the first optimizer step's loss and gradient (same weights, same batch: the difference
is the precision alone) and the next steps' losses (after updates that differ by the first
gradient's rounding). An online trainer's bf16 run updates on the fp32 run's samples
(``ReplayEngine``): a bf16 engine samples a slightly different distribution, and one differing
token changes everything after it.

Measured on the tiny preset (first step, bf16 vs fp32): loss 1e-5 - 1.2e-3 relative (PG: the
policy loss is ~0 at ratio 1, so its absolute difference: <= 6e-3); gradient 0.3% - 2.8% relative,
cosine > 0.9996; later losses <= 1.1% relative (PG <= 1.2e-3 absolute). The tolerances below
are 2-4x those.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from online_helpers import REWARD_RISE, mean_of, rl_config, train
from precision_helpers import first_steps, parity

from alignkit.config import load_config
from alignkit.models import load_policy
from alignkit.models.forward import token_logprobs
from alignkit.rollout import SamplingConfig, TransformersEngine, load_prompt_file
from alignkit.trainers.dpo import DPOConfig, build_dpo_trainer
from alignkit.trainers.pg import build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.reward import RewardConfig, build_reward_trainer
from alignkit.trainers.rl_config import PGConfig
from alignkit.trainers.safe_dpo import SafeDPOConfig, build_safe_dpo_trainer
from alignkit.trainers.safe_ppo import SafePPOConfig, build_safe_ppo_trainer
from alignkit.trainers.sft import SFTConfig, build_sft_trainer

#: No clipping (the gradient itself is compared), every step logged.
PARITY = ("optim.max_grad_norm=null", "logging.every=1")
#: First-step loss (relative), gradient (relative), cosine, later losses (relative).
OFFLINE = {"loss": 5e-3, "grad": 4e-2, "cosine": 0.999, "later_loss": 3e-2}
#: Online: the policy loss is ~0 at ratio 1, so its differences are absolute.
ONLINE = {"loss_abs": 2e-2, "grad": 6e-2, "cosine": 0.998, "later_loss_abs": 5e-3}


def assert_within(measured: dict[str, float], tolerances: dict[str, float]) -> None:
    for name, bound in tolerances.items():
        if name == "cosine":
            assert measured[name] >= bound, (name, measured)
        else:
            assert measured[name] <= bound, (name, measured)


def test_sft(task_files, run_settings, tmp_path):
    def build(precision):
        cfg = load_config(
            SFTConfig,
            None,
            run_settings(
                tmp_path,
                f"sft-{precision}",
                f"data.train_file={task_files['sft_train']}",
                "examples_per_device=16",
                "max_steps=3",
                f"precision={precision}",
                *PARITY,
            ),
        )
        return build_sft_trainer(cfg)

    assert_within(parity(first_steps(build)), OFFLINE)  # measured 8e-6, 3.3e-3, -, 8e-6


@pytest.mark.parametrize("kind", ["reward", "cost"])
def test_reward_and_cost_models(task_files, tmp_path, kind):
    train_file = task_files["preference_train" if kind == "reward" else "safety_train"]

    def build(precision):
        cfg = load_config(
            RewardConfig,
            None,
            [
                f"kind={kind}",
                f"data.train_file={train_file}",
                f"output_dir={tmp_path}",
                f"run_name={kind}-{precision}",
                "optim.lr=3e-3",
                "max_steps=3",
                "logging.progress_bar=false",
                "logging.plots=false",
                f"precision={precision}",
                *PARITY,
            ],
        )
        return build_reward_trainer(cfg)

    # Measured: reward 1.9e-4, 7.1e-3, -, 2.1e-3; cost 1.1e-5, 3.8e-3, -, 8.4e-4.
    assert_within(parity(first_steps(build)), OFFLINE)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo"])
def test_dpo_family(sft_run, head_of, run_settings, tmp_path, kind):
    def build(precision):
        cfg = load_config(
            DPOConfig,
            None,
            run_settings(
                tmp_path,
                f"dpo-{kind}-{precision}",
                f"model.name={sft_run.model_dir}",
                f"data.train_file={head_of('preference_train', 48)}",
                "examples_per_device=8",
                "optim.lr=1e-3",
                f"dpo.kind={kind}",
                "max_steps=3",
                f"precision={precision}",
                *PARITY,
            ),
        )
        return build_dpo_trainer(cfg)

    # Measured: loss 3.7e-5 - 1.2e-3, gradient 0.9% - 1.3%, later losses <= 1.1%.
    assert_within(parity(first_steps(build)), OFFLINE)


def test_safe_dpo(sft_run, head_of, run_settings, tmp_path):
    def build(precision):
        cfg = load_config(
            SafeDPOConfig,
            None,
            run_settings(
                tmp_path,
                f"safe-dpo-{precision}",
                f"model.name={sft_run.model_dir}",
                f"data.train_file={head_of('safety_train', 48)}",
                "examples_per_device=8",
                "optim.lr=1e-3",
                "max_steps=3",
                f"precision={precision}",
                *PARITY,
            ),
        )
        return build_safe_dpo_trainer(cfg)

    assert_within(parity(first_steps(build)), OFFLINE)  # measured 2.1e-4, 1.3e-2, -, 8.3e-3


def pg_settings(sft_run, task_files, tmp_path, name: str) -> list[str]:
    return [
        f"output_dir={tmp_path}",
        f"run_name={name}",
        f"model.name={sft_run.model_dir}",
        f"data.train_file={task_files['prompts_train']}",
        "rollout.prompts_per_iteration=4",
        "rollout.samples_per_prompt=4",
        "train.iterations=2",
        "train.sequences_per_device=16",
        "logging.progress_bar=false",
        "logging.plots=false",
        *PARITY,
    ]


@pytest.mark.parametrize("method", ["grpo", "ppo", "reinforce++"])
def test_policy_gradient(sft_run, task_files, tmp_path, method):
    def build(precision):
        settings = pg_settings(sft_run, task_files, tmp_path, f"{method}-{precision}")
        cfg = load_config(
            PGConfig,
            None,
            [
                *get_method(method).defaults,
                *settings,
                "rewards=[{function: assistant_helpfulness}]",
                "rollout.max_new_tokens=12",
                "kl.coef=0.05",
                f"precision={precision}",
            ],
        )
        return build_pg_trainer(cfg)

    # Measured: |loss| 8e-5 - 4e-4, gradient 1.3% - 2.0%, later |loss| <= 1.1e-3.
    assert_within(parity(first_steps(build, replay=True), loss="actor/pg_loss"), ONLINE)


def test_safe_ppo(sft_run, task_files, tmp_path):
    def build(precision):
        settings = pg_settings(sft_run, task_files, tmp_path, f"safe-ppo-{precision}")
        cfg = load_config(
            SafePPOConfig,
            Path(__file__).resolve().parents[2] / "examples" / "safe_ppo.yaml",
            [
                *get_method("safe-ppo").defaults,
                *settings,
                "data.eval_file=null",
                "eval.every=null",
                "data.max_eval_prompts=64",
                f"precision={precision}",
            ],
        )
        return build_safe_ppo_trainer(cfg)

    # Measured: |loss| 1.8e-4, gradient 2.8%, later |loss| 2.8e-4.
    assert_within(parity(first_steps(build, replay=True), loss="actor/pg_loss"), ONLINE)


# --------------------------------------------------------------------------------------
# The engine's log-probs against the trainer's forward
# --------------------------------------------------------------------------------------


@torch.no_grad()
def test_engine_logprobs_against_the_trainer_forward_in_bf16(sft_run, task_files):
    """Measured (the SFT model, 16 prompts x 8 samples x 24 tokens, 2976 tokens): fp32 engine
    vs fp32 forward max 5e-6; bf16 engine vs bf16 forward mean 1.6e-3, max 6.5e-2 (the logits
    are bf16 in both, computed in other layouts); a re-score in another batch: 0 padded, and
    mean 5e-8, max 5e-5 packed (the layout moves with the batch's rows); bf16 vs fp32 forward
    mean 3.8e-3, max 6.5e-2. So under bf16 a re-score is ~1e3x closer to the training forward
    than the engine (the trainer re-scores unless the update is exactly on-policy)."""
    model, tokenizer = load_policy(sft_run.model_dir)
    prompts = load_prompt_file(task_files["prompts_train"], tokenizer, 64)[:16]
    sampling = SamplingConfig(max_new_tokens=24, samples_per_prompt=8, temperature=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exp = TransformersEngine(model, tokenizer).generate(
            prompts, sampling, generator=torch.Generator().manual_seed(0)
        )
    mask = exp.response_mask

    def score(rows: list[int], packed: bool, bf16: bool = True) -> torch.Tensor:
        batch = {"input_ids": exp.input_ids[rows], "attention_mask": exp.attention_mask[rows]}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return token_logprobs(model, batch, mask[rows], packed=packed).float()

    every, half = list(range(len(exp))), list(range(0, len(exp), 2))
    forward = score(every, packed=True)
    engine_gap = (exp.behaviour_logprobs - forward)[mask].abs()
    assert 1e-5 < float(engine_gap.mean()) < 5e-3 and float(engine_gap.max()) < 0.2
    padded = score(every, packed=False)
    assert torch.equal(score(half, packed=False), padded[half])  # batch-invariant
    repacked = (score(half, packed=True) - forward[half])[mask[half]].abs()
    assert float(repacked.mean()) < 0.05 * float(engine_gap.mean())
    fp32_gap = (forward - score(every, packed=True, bf16=False))[mask].abs()
    assert float(fp32_gap.mean()) < 1e-2 and float(fp32_gap.max()) < 0.2


def test_bf16_rescores_the_old_logprobs_unless_exactly_on_policy(sft_run, task_files, tmp_path):
    def build(name: str, *overrides: str):
        cfg = load_config(
            PGConfig,
            None,
            [
                *get_method("grpo").defaults,
                *pg_settings(sft_run, task_files, tmp_path, name),
                "rewards=[{function: assistant_helpfulness}]",
                "precision=bf16",
                *overrides,
            ],
        )
        return build_pg_trainer(cfg)

    assert build("on-policy").behaviour_is_old_policy  # one step per iteration
    trainer = build("two-steps", "train.sequences_per_minibatch=8", "train.sequences_per_device=4")
    assert not trainer.behaviour_is_old_policy
    gaps = []
    loss = trainer.policy_loss

    def spy(logp, old_logp, *args, **kwargs):
        gaps.append(float((logp.detach() - old_logp)[args[1]].abs().max()))
        return loss(logp, old_logp, *args, **kwargs)

    trainer.policy_loss = spy
    trainer.train()
    # The first micro-batch: the re-score's numbers up to the packed layout (measured 1.2e-2
    # max, the rows' shared prompts split differently), far below the engine's 6.5e-2.
    assert gaps[0] < 3e-2


# --------------------------------------------------------------------------------------
# Learning in bf16
# --------------------------------------------------------------------------------------


def test_sft_learns_in_bf16(task_files, run_settings, tmp_path):
    cfg = load_config(
        SFTConfig,
        None,
        run_settings(
            tmp_path,
            "sft-bf16",
            f"data.train_file={task_files['sft_train']}",
            f"data.eval_file={task_files['sft_heldout']}",
            "epochs=6",
            "examples_per_device=16",
            "optim.lr=5e-3",
            "optim.schedule=cosine",
            "optim.warmup_ratio=0.05",
            "logging.every=14",
            "precision=bf16",
        ),
    )
    summary = build_sft_trainer(cfg).train()
    # Held-out loss, untrained 6.95 (test_sft); after these 6 epochs measured 1.297 in fp32
    # and 1.300 in bf16 (after 3: 1.922 both).
    assert summary["precision"]["name"] == "bf16"
    assert summary["eval"]["eval/loss"] < 1.1 * 1.297


def test_dpo_learns_in_bf16(sft_run, task_files, head_of, run_settings, tmp_path):
    cfg = load_config(
        DPOConfig,
        None,
        run_settings(
            tmp_path,
            "dpo-bf16",
            f"model.name={sft_run.model_dir}",
            f"data.train_file={head_of('preference_train', 160)}",
            f"data.eval_file={task_files['preference_heldout']}",
            "examples_per_device=8",
            "optim.lr=1e-3",
            "dpo.beta=0.1",
            "epochs=1",
            "precision=bf16",
        ),
    )
    summary = build_dpo_trainer(cfg).train()
    # fp32 (test_dpo): held-out accuracy 1.0, margin ~5, loss log 2 -> < 0.35.
    assert summary["eval"]["eval/rewards/accuracies"] >= 0.9
    assert summary["eval"]["eval/rewards/margins"] > 1.0
    assert summary["eval"]["eval/loss"] < 0.5 * math.log(2)


def test_grpo_raises_the_sorting_reward_in_bf16(sort_task):
    # 16 prompts per iteration: with 8 (test_online's fp32 setting) the rise over seeds 0-2
    # was 0.07, 0.10, 0.09 in fp32 and 0.02, 0.16, 0.07 in bf16, too noisy for one seed; with
    # 16 it was 0.08, 0.11, 0.13 in bf16.
    cfg = rl_config(
        sort_task,
        "grpo",
        "rise_grpo_bf16",
        "train.iterations=40",
        "rollout.prompts_per_iteration=16",
        "precision=bf16",
    )
    _, records = train(cfg)
    rewards = [r for r in records if "reward/mean" in r]
    first, last = mean_of(rewards[:5], "reward/mean"), mean_of(rewards[-5:], "reward/mean")
    assert last - first > REWARD_RISE, (first, last)
