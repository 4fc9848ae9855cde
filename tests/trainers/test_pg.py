"""The policy-gradient trainer's components: KLPenalty, ReferencePolicy, Critic, and the
process-global batch statistics (2 gloo processes must equal 1).

The trainer end to end (learning, resume, KL strength) is tested in test_online.py.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import launched_pg
import pytest
import torch
from launch_helpers import accelerate_launch
from torch import nn

from alignkit.config import load_config
from alignkit.data.synthetic import write_verifiable_tasks
from alignkit.models import LoraSettings, load_policy
from alignkit.ops.kl import kl_loss
from alignkit.rollout import Experience
from alignkit.tracking import latest_checkpoint, read_metrics
from alignkit.trainers.kl_penalty import KLPenalty
from alignkit.trainers.pg import build_pg_trainer
from alignkit.trainers.reference import ReferencePolicy
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import KLConfig, PGConfig

LAUNCHED_PG = Path(launched_pg.__file__)

REWARD = textwrap.dedent(
    """
    def spread(prompts, completions, **_):
        # Deterministic scores that vary between the untrained tiny model's completions.
        return [float(sum(map(ord, c)) % 5) / 4 for c in completions]
    """
)


def experience(n: int = 3, width: int = 6, seed: int = 0) -> Experience:
    """Rows of 2 prompt columns then ragged responses, with old, reference and IS log-probs."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4, 1, 3, 2, 4, 3][:n])
    mask = torch.zeros(n, width, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        mask[row, 2 : 2 + length] = True

    def logprobs() -> torch.Tensor:
        return torch.where(mask, -torch.rand(n, width, generator=generator) * 3, 0.0)

    return Experience(
        input_ids=torch.randint(1, 50, (n, width), generator=generator),
        attention_mask=torch.ones(n, width, dtype=torch.long),
        response_mask=mask,
        prompt_width=2,
        behaviour_logprobs=logprobs(),
        scores=torch.randn(n, generator=generator),
        group_index=torch.zeros(n, dtype=torch.long),
        response_lengths=lengths,
        truncated=torch.zeros(n, dtype=torch.bool),
        prompts=["p"] * n,
        completions=["c"] * n,
        row_fields=[{}] * n,
        old_logprobs=logprobs(),
        reference_logprobs=logprobs(),
        is_weights=torch.rand(n, width, generator=generator) + 0.5,
    )


# --------------------------------------------------------------------------------------
# KLPenalty
# --------------------------------------------------------------------------------------


def test_kl_in_the_reward_subtracts_beta_kl_from_each_response_tokens_reward():
    exp = experience()
    kl = KLPenalty(KLConfig(coef=0.5, placement="reward", estimator="k2"))
    scores = torch.randn(exp.response_mask.shape, generator=torch.Generator().manual_seed(1))
    shaped = kl.shape_rewards(scores, exp)
    for b in range(len(exp)):
        for t in range(exp.width):
            d = float(exp.old_logprobs[b, t] - exp.reference_logprobs[b, t])
            want = float(scores[b, t]) - 0.5 * 0.5 * d * d if exp.response_mask[b, t] else 0.0
            assert shaped[b, t].item() == pytest.approx(want, rel=1e-6, abs=1e-6), (b, t)
    mask = exp.response_mask
    assert kl.loss_term(exp.old_logprobs, exp, mask, "token-mean", torch.tensor(12.0)) is None
    k1 = (exp.old_logprobs - exp.reference_logprobs)[exp.response_mask].mean()
    assert kl.metrics(exp)["kl/mean"].item() == pytest.approx(k1.item(), rel=1e-6)


def test_kl_in_the_loss_is_the_weighted_estimator_over_the_steps_units():
    exp = experience()
    kl = KLPenalty(KLConfig(coef=0.3, placement="loss"))  # k3+ by default
    scores = torch.randn(exp.response_mask.shape)
    assert kl.shape_rewards(scores, exp) is scores
    logp = (exp.old_logprobs + 0.1 * torch.randn(exp.response_mask.shape)).requires_grad_(True)
    mask = exp.response_mask
    term = kl.loss_term(logp, exp, mask, "token-mean", torch.tensor(40.0))  # N: step's tokens
    ratio = (logp.detach() - exp.old_logprobs).exp() * exp.is_weights
    brute = (kl_loss(logp, exp.reference_logprobs, "k3+") * ratio)[mask].sum() / 40
    torch.testing.assert_close(term, brute)
    term.backward()  # the gradient flows through logp only
    assert logp.grad[mask].abs().sum() > 0 and logp.grad[~mask].abs().sum() == 0
    # Aggregated like the policy loss: Dr. GRPO's constant normaliser included.
    norm = kl.loss_term(logp, exp, mask, "seq-mean-token-sum-norm", torch.tensor(30.0))
    torch.testing.assert_close(norm, term * 40 / 30)


def test_the_controller_moves_after_the_iteration_and_the_coefficient_used_is_logged():
    kl = KLPenalty(KLConfig(coef=0.1, controller="adaptive", rule="multiplicative", target=0.2))
    assert kl.after_iteration({"kl/mean": torch.tensor(0.5)}, 64) == {"kl/coef": 0.1}
    assert kl.coef == pytest.approx(0.15)  # 0.5 > 1.5 * target: x1.5
    off = KLPenalty(KLConfig(coef=0.0))
    exp = experience()
    exp.reference_logprobs = None
    assert not off.enabled and off.after_iteration({}, 64) == {} and off.metrics(exp) == {}
    assert off.reference_logprobs(exp, lambda model, e: 1 / 0) is None  # never scored


# --------------------------------------------------------------------------------------
# ReferencePolicy (one for the online KL term and for DPO)
# --------------------------------------------------------------------------------------


def _trainer_stub(policy: nn.Module) -> SimpleNamespace:
    def prepare_frozen(model: nn.Module) -> nn.Module:
        return model.requires_grad_(False).eval()

    return SimpleNamespace(model=policy, unwrapped_model=policy, prepare_frozen=prepare_frozen)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[3, 7, 11, 5]])).logits


def test_the_initial_policy_is_a_frozen_snapshot_online_and_the_policy_itself_for_dpo():
    policy, _ = load_policy("tiny", seed=0)
    policy.train()
    before = _logits(policy)
    online = ReferencePolicy(_trainer_stub(policy), None, dtype="float32", snapshot=True)
    once = ReferencePolicy(_trainer_stub(policy), None, dtype="float32", snapshot=False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05)  # an update
    with online.use() as reference:
        assert reference is not policy and not reference.training
        assert not any(p.requires_grad for p in reference.parameters())
        torch.testing.assert_close(_logits(reference), before)
    with once.use() as reference:
        assert reference is policy and not policy.training
    assert policy.training  # the policy's mode is back


def test_with_lora_the_reference_is_the_policy_with_its_adapter_switched_off():
    policy, _ = load_policy("tiny", seed=0, lora=LoraSettings(r=2, alpha=4.0))
    base = _logits(policy)  # the adapter starts as a no-op (B = 0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert (_logits(policy) - base).abs().max() > 1e-3
    reference = ReferencePolicy(_trainer_stub(policy), None, dtype="float32", snapshot=True)
    assert reference.model is None  # no second copy
    with reference.use() as model:
        assert model is policy
        torch.testing.assert_close(_logits(model), base)
    assert (_logits(policy) - base).abs().max() > 1e-3  # the adapter is back on


# --------------------------------------------------------------------------------------
# The trainer's update with the components, on the tiny model
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pg")
    (root / "reward.py").write_text(REWARD)
    return {"root": root, **write_verifiable_tasks(root / "data")}


def tiny_config(task: dict[str, Path], method: str, name: str, *overrides: str) -> PGConfig:
    base = (
        f"output_dir={task['root']}",
        f"run_name={name}",
        "model.name=tiny",
        f"data.train_file={task['sort_prompts']}",
        "data.max_prompt_length=32",
        f"rewards=[{{function: {task['root'] / 'reward.py'}:spread}}]",
        "rollout.prompts_per_iteration=4",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=6",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
    )
    return load_config(PGConfig, None, [*get_method(method).defaults, *base, *overrides])


def test_ppo_step_metrics_and_update_do_not_depend_on_the_micro_batch_split(task):
    # Both optimizer steps (policy and critic) weigh each micro-batch by its share of the
    # step: with eps >> |g| and no clipping the update is ~lr * g, and every metric is equal.
    runs = []
    for per_device in (16, 4):
        cfg = tiny_config(
            task,
            "ppo",
            f"ppo_split{per_device}",
            "train.iterations=2",
            f"train.sequences_per_device={per_device}",
            "policy_loss.entropy_coef=0.01",
            "kl.coef=0.1",
            "kl.placement=loss",
            "critic.lr=1e-2",
            "optim.eps=1.0",
            "optim.max_grad_norm=null",
        )
        trainer = build_pg_trainer(cfg)
        trainer.train()
        weights = [p.detach().clone() for p in trainer.critic.model.parameters()]
        runs.append((read_metrics(trainer.run_dir.metrics_path), weights))
    (whole, whole_critic), (split, split_critic) = runs
    names = ("critic/vf_loss", "critic/vf_clipfrac", "critic/grad_norm", "grad_norm")
    for want, got in zip(whole, split, strict=True):
        assert want["critic/vf_loss"] > 0 and want["step"] == got["step"]
        for key in (*names, "actor/entropy", "actor/kl_loss", "actor/pg_clipfrac"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(whole_critic, split_critic, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_policy_loss_receives_the_config_fields_it_names(task):
    ppo = build_pg_trainer(tiny_config(task, "grpo", "settings", "policy_loss.dual_clip=3.0"))
    assert ppo.policy_loss_settings == {  # null fields at the loss' defaults
        "clip_ratio": 0.2,
        "clip_ratio_high": None,
        "dual_clip": 3.0,
        "delta": None,
    }
    plain = build_pg_trainer(tiny_config(task, "reinforce", "settings"))
    assert plain.policy_loss_settings == {}  # agg and the tensors are the trainer's to pass


# --------------------------------------------------------------------------------------
# Batch statistics over processes: 2 gloo processes equal 1
# --------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_two_processes_whiten_and_update_like_one_on_the_same_sequences(task):
    # REINFORCE normalises the returns over the batch, then advantage.whiten whitens them:
    # both statistics must span the two processes' halves of the iteration.
    settings = (
        f"output_dir={task['root']}",
        "model.name=tiny",
        f"data.train_file={task['sort_prompts']}",
        "data.max_prompt_length=32",
        f"rewards=[{{function: {task['root'] / 'reward.py'}:spread}}]",
        "rollout.prompts_per_iteration=8",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=6",
        "train.iterations=1",
        "train.sequences_per_device=8",
        "advantage.whiten=true",
        "optim.lr=1e-3",
        "optim.eps=1.0",
        "optim.max_grad_norm=null",
        "logging.progress_bar=false",
        "logging.plots=false",
    )
    jobs = [{"method": "reinforce", "recorder": "advantages", "args": [*settings, "run_name=two"]}]
    launched = accelerate_launch(LAUNCHED_PG, json.dumps(jobs), root=task["root"])
    assert launched.returncode == 0, launched.stderr[-3000:]
    launched_pg.train("reinforce", "advantages", [*settings, "run_name=one"])
    advantages, metrics, weights = {}, {}, {}
    for name in ("one", "two"):
        run = task["root"] / name
        advantages[name] = {}
        for path in sorted(run.glob("advantages-*.json")):
            advantages[name].update(json.loads(path.read_text()))
        metrics[name] = read_metrics(run / "metrics.jsonl")[-1]
        from safetensors.torch import load_file

        weights[name] = load_file(latest_checkpoint(run) / "model" / "model.safetensors")
    assert len(list((task["root"] / "two").glob("advantages-*.json"))) == 2
    one, two = advantages["one"], advantages["two"]
    assert len(one) == 32 and one.keys() == two.keys()
    spread = [a for row in one.values() for a in row]
    mean = sum(spread) / len(spread)
    assert abs(mean) < 1e-5 and max(spread) - min(spread) > 1  # whitened, not all zero
    for key, row in one.items():
        assert two[key] == pytest.approx(row, rel=1e-4, abs=1e-5), key
    for key in ("grad_norm", "actor/pg_loss", "actor/entropy", "reward/mean"):
        assert metrics["two"][key] == pytest.approx(metrics["one"][key], rel=1e-4, abs=1e-6), key
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["two"][key], value, rtol=1e-5, atol=1e-7)
    assert not math.isnan(metrics["one"]["grad_norm"])
