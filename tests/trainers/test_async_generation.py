"""Asynchronous generation (``rollout.max_staleness``, ``trainers/async_rollout.py``).

What no peer tests: with ``max_staleness: 0`` the asynchronous code path (worker thread,
hand-over, the engine's sync before each submission) reproduces the synchronous run exactly;
with 1, every batch is at most one update stale and the run still learns.
"""

from __future__ import annotations

import threading

import pytest
import torch
from metric_helpers import is_clock_metric
from online_helpers import mean_of, rl_config, train

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.models import load_policy
from alignkit.rollout import SamplingConfig, SnapshotEngine, TransformersEngine, load_prompt_file
from alignkit.tracking import read_metrics
from alignkit.trainers.async_rollout import AsyncGeneration
from alignkit.trainers.distill_config import DistillConfig
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer
from alignkit.trainers.registry import get_method

#: Only the asynchronous run logs these (how long the main thread waited, the staleness).
_ASYNC_ONLY = ("timing/rollout_wait", "rollout/policy_staleness")


@pytest.mark.parametrize(
    ("method", "extra"),
    [("grpo", ("kl.coef=0.05",)), ("ppo", ("train.epochs_per_iteration=2",))],
)
def test_staleness_zero_reproduces_the_synchronous_run(sort_task, method, extra):
    runs = {}
    for name, staleness in (("sync", ()), ("async0", ("rollout.max_staleness=0",))):
        cfg = rl_config(
            sort_task, method, f"{method}-{name}", "train.iterations=3", *extra, *staleness
        )
        trainer, records = train(cfg)
        runs[name] = records, [p.detach().clone() for p in trainer.unwrapped_model.parameters()]
    (sync, sync_weights), (async0, async_weights) = runs["sync"], runs["async0"]
    assert [r["rollout/policy_staleness"] for r in async0 if r["step"] > 0] == [0.0] * 3
    assert len(sync) == len(async0)
    for want, have in zip(sync, async0, strict=True):
        for key in want.keys() | have.keys():
            if is_clock_metric(key) or key in _ASYNC_ONLY:
                continue
            assert have[key] == want[key], (want["step"], key)  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(sync_weights, async_weights, strict=True))


def test_staleness_one_trains_each_batch_at_most_one_update_late_and_learns(sort_task):
    cfg = rl_config(sort_task, "grpo", "async1", "train.iterations=24", "rollout.max_staleness=1")
    trainer, records = train(cfg)
    assert isinstance(trainer.engine, SnapshotEngine)  # the in-process engine on a copy
    staleness = [r["rollout/policy_staleness"] for r in records if r["step"] > 0]
    # The first batch is sampled before any update; every later one during the previous update.
    assert staleness == [0.0] + [1.0] * 23
    iterations = [r for r in records if "reward/mean" in r]
    # Stale batches are re-scored and importance-weighted (rollout.correction's default cap).
    assert all("rollout/is_weight_mean" in r for r in iterations[1:])
    first, last = mean_of(iterations[:5], "reward/mean"), mean_of(iterations[-5:], "reward/mean")
    # Synchronous GRPO rises by ~0.13 over 40 iterations from this warm-up (test_online).
    assert last - first > 0.03, (first, last)


def test_each_batch_logs_the_weight_lag_of_its_own_sampler(sort_task):
    """With a sync every 2 optimizer steps, the engine's copy lags 0 or 1 step when a batch is
    submitted; that lag is logged with the batch it sampled, not with the batch submitted
    after it (which the main thread's sync state would hold by logging time)."""
    cfg = rl_config(sort_task, "grpo", "async-lag", "train.iterations=7", "rollout.max_staleness=1")
    trainer = build_pg_trainer(cfg)
    trainer.sync_every = 2  # rollout.vllm.sync_every's schedule, on the in-process copy
    trainer.train()
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if r["step"] > 0]
    # Batches 0 and 1 are submitted before the first update (both from the first sync); batch
    # k >= 2 at step k - 1: synced when 2 steps behind, so lags 1, 0, 1, 0, ...
    assert [r["rollout/weight_staleness"] for r in records] == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert [r["rollout/policy_staleness"] for r in records] == [0.0] + [1.0] * 6


def test_the_snapshot_engine_samples_its_copy_until_synced(sort_task):
    model, tokenizer = load_policy(str(sort_task["model"]))
    prompts = load_prompt_file(sort_task["sort_prompts"], tokenizer, 32)[:4]
    sampling = SamplingConfig(max_new_tokens=7, samples_per_prompt=2, temperature=1.0)
    engine = SnapshotEngine(model, tokenizer)

    def sample(e):
        return e.generate(prompts, sampling, generator=torch.Generator().manual_seed(3))

    same = sample(engine), sample(TransformersEngine(model, tokenizer))
    assert torch.equal(same[0].input_ids, same[1].input_ids)
    assert torch.equal(same[0].behaviour_logprobs, same[1].behaviour_logprobs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale = sample(engine)
    assert torch.equal(stale.behaviour_logprobs, same[0].behaviour_logprobs)  # the old copy
    engine.sync_weights(model)
    fresh, trainers = sample(engine), sample(TransformersEngine(model, tokenizer))
    assert torch.equal(fresh.behaviour_logprobs, trainers.behaviour_logprobs)
    assert not torch.equal(fresh.behaviour_logprobs, same[0].behaviour_logprobs)
    assert not any(p.requires_grad for p in engine.model.parameters())


def test_the_worker_generates_on_another_thread_and_its_errors_reach_the_trainer():
    threads: list[str] = []

    def generate(prompts, offset, generator):
        threads.append(threading.current_thread().name)
        if offset == 2:
            raise RuntimeError("the engine failed on batch 2")
        return f"batch {offset}"

    versions = iter(range(10))
    pipeline = AsyncGeneration(
        1,
        prepare=lambda i: ([], i, torch.Generator()),
        generate=generate,
        stats=lambda: {"tokens": 1.0},
        autocast=lambda: torch.autocast("cpu", enabled=False),
        version=lambda: next(versions),
    )
    first, _ = pipeline.take(0, last_iteration=5)
    second, _ = pipeline.take(1, last_iteration=5)
    assert (first.exp, first.version, second.exp, second.version) == ("batch 0", 0, "batch 1", 1)
    assert first.engine_stats == {"tokens": 1.0}
    assert threads and all(name.startswith("alignkit-rollout") for name in threads)
    with pytest.raises(RuntimeError, match="failed on batch 2"):
        pipeline.take(2, last_iteration=5)
    pipeline.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("rollout.max_staleness=2",), "must be null, 0 or 1"),
        (("rollout.max_staleness=1", "rollout.filter_groups=true"), "filter_groups"),
    ],
)
def test_settings_asynchronous_generation_cannot_serve_are_refused(sort_task, overrides, message):
    with pytest.raises(ConfigError, match=message):
        rl_config(sort_task, "grpo", "refused", *overrides)


def test_an_engine_reading_the_trainers_module_cannot_run_one_step_ahead(sort_task):
    cfg = rl_config(sort_task, "grpo", "shared-engine", "rollout.max_staleness=1")
    model, tokenizer = load_policy(str(sort_task["model"]))
    prompts = load_prompt_file(sort_task["sort_prompts"], tokenizer, 32)
    with pytest.raises(ConfigError, match="reads the trainer's own module"):
        PolicyGradientTrainer(
            cfg, model, tokenizer, prompts, reward=None, engine=TransformersEngine(model, tokenizer)
        )


def test_distillation_refuses_stale_samples(sort_task, tmp_path):
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(
            DistillConfig,
            None,
            [
                *get_method("distill").defaults,
                f"output_dir={tmp_path}",
                f"model.name={sort_task['model']}",
                f"distill.teacher={sort_task['model']}",
                f"data.train_file={sort_task['sort_prompts']}",
                "rollout.max_staleness=0",
            ],
        )
