"""The rollout correction in the policy-gradient trainer, and the sync hook of an engine with its
own weights (what a vLLM server is), on the tiny model without vLLM.

- the trainer's target under a truncating sampler is the truncated distribution (one
  ``token_logprobs`` with ``logits_filter``, padded or packed), so in-process top-k/top-p
  rollouts get weights of 1, not the kept mass (trl#6789);
- the correction's metrics and its settings reach the weights;
- an engine with its own copy is synced every ``sync_every`` optimizer steps (staleness logged
  and corrected), always before an evaluation, and after ``--resume`` before the first rollout;
- the engine is closed when training ends, also by an error.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from alignkit.config import load_config
from alignkit.data.synthetic import write_verifiable_tasks
from alignkit.models import load_policy
from alignkit.models.forward import token_logprobs
from alignkit.ops.sampling import sampling_distribution, truncate_logits
from alignkit.rollout import TransformersEngine
from alignkit.rollout.engine import unwrap_for_generation
from alignkit.tracking import read_metrics
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig


def _config(tmp_path, name: str, *overrides: str) -> PGConfig:
    paths = write_verifiable_tasks(tmp_path / "data")
    reward = tmp_path / "length.py"  # varies within every group, so every update moves weights
    reward.write_text(
        "def length(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n"
    )
    base = (
        f"output_dir={tmp_path}",
        f"run_name={name}",
        "model.name=tiny",
        f"data.train_file={paths['sort_prompts']}",
        "data.max_prompt_length=32",
        f"rewards=[{{function: {reward}:length}}]",
        "logging.every=1",
        "rollout.prompts_per_iteration=4",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=6",
        "train.sequences_per_device=16",
        "optim.lr=1e-2",
        "logging.progress_bar=false",
        "logging.plots=false",
    )
    return load_config(PGConfig, None, [*get_method("grpo").defaults, *base, *overrides])


@pytest.mark.parametrize("packed", [True, False])
def test_a_logits_filter_scores_the_truncated_distribution(packed):
    model, _ = load_policy("tiny", seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    scored = torch.zeros_like(ids)
    scored[:, 5:] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():  # scored tokens of rank 0 and 2 (kept) and random ones (removed)
        for t in range(5, 9):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            ranked = logits[:, t - 1].argsort(dim=-1, descending=True)
            ids[0, t], ids[1, t] = ranked[0, 0], ranked[1, 2]
    batch = {"input_ids": ids, "attention_mask": mask}
    truncation = partial(truncate_logits, top_k=7, top_p=0.6)
    with torch.no_grad():
        got = token_logprobs(
            model, batch, scored, temperature=0.8, packed=packed, logits_filter=truncation
        )
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    want = torch.zeros_like(got)
    for row in range(3):
        dist = sampling_distribution(logits[row, 4:8], 0.8, top_k=7, top_p=0.6)
        want[row, 5:] = dist.gather(1, ids[row, 5:, None]).squeeze(1)
    finite = torch.isfinite(want)
    assert finite[:, 5:].any() and (~finite).any()  # kept and removed tokens both occur
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=1e-5)
    assert torch.equal(torch.isfinite(got), finite)


def test_truncated_in_process_rollouts_get_weights_of_one_not_the_kept_mass(tmp_path):
    cfg = _config(tmp_path, "topk", "rollout.top_k=5", "rollout.temperature=1.5")
    trainer = build_pg_trainer(cfg)
    assert trainer.corrects_behaviour and not trainer.engine_samples_policy
    trainer._prepare_training()
    prompts, offset = trainer.iteration_prompts(0)
    exp = trainer.make_experience(prompts, offset, torch.Generator().manual_seed(0))
    mask = exp.response_mask
    # The PPO ratio's old log-probs are the full softmax; the sampler's are renormalised over
    # the top 5: they differ by the log of the kept mass ...
    log_kept_mass = (exp.old_logprobs - exp.behaviour_logprobs)[mask]
    assert log_kept_mass.max() < -0.01
    # ... which the weights do not carry (a full-vocabulary target would give exp(log S)).
    torch.testing.assert_close(
        exp.is_weights[mask], torch.ones_like(log_kept_mass), rtol=0, atol=1e-4
    )
    metrics = trainer.experience_metrics(exp)
    assert float(metrics["rollout/is_weight_mean"]) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics["rollout/is_truncated_frac"]) == 0.0
    assert abs(float(metrics["rollout/mismatch_kl_k1"])) < 1e-5
    assert 0.0 <= float(metrics["rollout/mismatch_kl_k3"]) < 1e-6
    assert float(metrics["sampling/ess"]) == pytest.approx(1.0, abs=1e-4)


def test_the_correction_settings_reach_the_weights(tmp_path):
    cfg = _config(
        tmp_path, "seq", "rollout.top_p=0.8",
        "rollout.correction.level=sequence", "rollout.correction.mode=mask",
        "rollout.correction.cap=1.5",
    )  # fmt: skip
    trainer = build_pg_trainer(cfg)
    trainer._prepare_training()
    prompts, offset = trainer.iteration_prompts(0)
    with torch.no_grad():  # a behaviour that differs per sequence: some ratios exceed the cap
        exp = trainer.engine.generate(prompts, trainer.sampling, generator=torch.Generator())
        shift = torch.linspace(-0.3, 0.3, exp.response_mask.shape[0])[:, None]
    real = trainer.engine.generate
    trainer.engine.generate = lambda *a, **k: _shifted(real(*a, **k), shift)
    exp = trainer.make_experience(prompts, offset, torch.Generator().manual_seed(0))
    weights, mask = exp.is_weights, exp.response_mask
    for row in range(weights.shape[0]):  # one weight per sequence, 0 where the ratio > 1.5
        values = weights[row][mask[row]]
        assert torch.allclose(values, values[0].expand_as(values))
        length = int(mask[row].sum())
        ratio = torch.exp(-shift[row, 0] * length)
        assert float(values[0]) == pytest.approx(0.0 if ratio > 1.5 else float(ratio), rel=1e-3)
    metrics = trainer.experience_metrics(exp)
    assert 0.0 < float(metrics["rollout/is_masked_frac"]) < 1.0
    assert float(metrics["rollout/mismatch_kl_k1"]) != 0.0


def _shifted(exp, shift):
    exp.behaviour_logprobs = torch.where(
        exp.response_mask, exp.behaviour_logprobs + shift, exp.behaviour_logprobs
    )
    return exp


class CopyingEngine(TransformersEngine):
    """A private copy of the policy, refreshed only by ``sync_weights`` (counted)."""

    logprobs_match_trainer = False
    needs_weight_sync = True

    def __init__(self, model, tokenizer) -> None:
        super().__init__(copy.deepcopy(unwrap_for_generation(model)), tokenizer)
        self.syncs = self.closed = 0

    def sync_weights(self, model) -> None:
        self.model.load_state_dict(unwrap_for_generation(model).state_dict())
        self.syncs += 1

    def close(self) -> None:
        self.closed += 1


def _with_copying_engine(cfg: PGConfig, trainer_class=PolicyGradientTrainer):
    built = build_pg_trainer(cfg)
    engine = CopyingEngine(built.unwrapped_model, built.tokenizer)
    trainer = trainer_class(
        cfg, built.unwrapped_model, built.tokenizer, built.prompts, built.reward,
        engine=engine, eval_prompts=built.eval_prompts,
    )  # fmt: skip
    return trainer, engine


def test_sync_every_n_optimizer_steps_records_and_corrects_the_staleness(tmp_path):
    cfg = _config(tmp_path, "every2", "train.iterations=5")
    trainer, engine = _with_copying_engine(cfg)
    trainer.sync_every = 2  # rollout.vllm.sync_every, for an engine that is not vLLM
    trainer.train()
    records = read_metrics(trainer.run_dir.metrics_path)
    assert [r["rollout/weight_staleness"] for r in records] == [0, 1, 0, 1, 0]
    assert engine.syncs == 1 + 2 and engine.closed == 1  # initial, before iterations 3 and 5
    # Rollouts of the stale copy are weighed away from 1; fresh ones are not.
    gaps = [abs(r["rollout/is_weight_mean"] - 1) + r["rollout/mismatch_kl_k3"] for r in records]
    assert max(gaps[0::2]) < 1e-4 and min(gaps[1::2]) > 1e-4


def test_evaluation_syncs_first_and_a_resumed_run_pushes_the_checkpoint(tmp_path):
    paths = write_verifiable_tasks(tmp_path / "data")
    evaluation = (f"data.eval_file={paths['sort_heldout']}", "data.max_eval_prompts=4")
    settings = ("train.iterations=4", "checkpoint.every=2", "eval.every=2", *evaluation)

    class Killed(Exception):
        pass

    class Dies(PolicyGradientTrainer):
        def optimize(self, minibatch):
            if self.state.step == 3:
                raise Killed
            return super().optimize(minibatch)

    trainer, engine = _with_copying_engine(_config(tmp_path, "cut", *settings), Dies)
    trainer.sync_every = 3
    seen = []
    generate = engine.generate

    def watched(prompts, sampling, **kwargs):
        current = trainer.unwrapped_model.state_dict()
        fresh = all(torch.equal(v, current[k]) for k, v in engine.model.state_dict().items())
        seen.append((trainer.state.step, sampling.greedy, fresh))
        return generate(prompts, sampling, **kwargs)

    engine.generate = watched
    with pytest.raises(Killed):
        trainer.train()
    assert engine.closed == 1  # the servers are stopped on an error too
    # evaluations (greedy) always see the current weights; rollouts may be 1-2 steps stale
    assert [step for step, greedy, fresh in seen if greedy and fresh] == [0, 2]
    assert [fresh for step, greedy, fresh in seen if not greedy] == [True, False, True, False]

    resumed, engine = _with_copying_engine(
        _config(tmp_path, "ignored", *settings, f"resume_from={tmp_path / 'cut'}")
    )
    resumed.sync_every = 3
    first = []
    generate = engine.generate
    engine.generate = lambda prompts, sampling, **kw: (
        first.append(
            all(
                torch.equal(v, resumed.unwrapped_model.state_dict()[k])
                for k, v in engine.model.state_dict().items()
            )
        )
        or generate(prompts, sampling, **kw)
    )
    resumed.train()
    assert first[0]  # the checkpoint's weights reached the engine before its first rollout
    assert engine.closed == 1
