"""TransformersEngine: distribution, recorded log-probs, sampling filters, reproducibility."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import EOS, TinyVocabTokenizer, chi_square_pvalue, tiny_llama

from alignkit.ops import sequence_logprobs
from alignkit.ops.sampling import sampling_distribution
from alignkit.rollout import GenerationEngine, Prompt, SamplingConfig, TransformersEngine

VOCAB = 8


@pytest.fixture(scope="module")
def small():
    return tiny_llama(VOCAB, 1, 16, 40.0), TinyVocabTokenizer(VOCAB)


def _prompts() -> list[Prompt]:
    # Different lengths: left padding of 0, 2 and 3 columns.
    return [
        Prompt("a", [2, 3, 4, 5], {"k": 0}),
        Prompt("b", [6, 7], {"k": 1}),
        Prompt("c", [3], {"k": 2}),
    ]


def _rescored(model, exp, temperature: float) -> torch.Tensor:
    positions = (exp.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(
            input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=positions
        ).logits
    return sequence_logprobs(logits / temperature, exp.input_ids, exp.response_mask)


def test_engine_satisfies_the_protocol(small) -> None:
    assert isinstance(TransformersEngine(*small), GenerationEngine)


def test_one_token_samples_follow_the_model_distribution(small) -> None:
    model, tokenizer = small
    prompt = Prompt("p", [2, 5, 3], {})
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1].softmax(-1)
    n = 4000
    exp = TransformersEngine(model, tokenizer).generate(
        [prompt],
        SamplingConfig(max_new_tokens=1, samples_per_prompt=n),
        generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(exp.input_ids[:, -1], minlength=VOCAB).double()
    expected = probs.double() * n
    keep = expected > 5  # chi-square needs expected counts above ~5; pool the rest
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([expected[keep], expected[~keep].sum()[None]])
    assert int(keep.sum()) >= 4  # the test has power: several categories are compared
    assert chi_square_pvalue(observed, expected) > 0.001
    # and a visibly wrong distribution (uniform) is rejected with these counts
    uniform = torch.full((VOCAB,), n / VOCAB, dtype=torch.double)
    assert chi_square_pvalue(counts, uniform) < 1e-6


@pytest.mark.parametrize("lean", [True, False], ids=["lean-decode", "transformers-decode"])
@pytest.mark.parametrize("samples", [1, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_equal_a_rescoring_forward(small, samples, temperature, lean) -> None:
    model, tokenizer = small
    exp = TransformersEngine(model, tokenizer, lean_decode=lean).generate(
        _prompts(),
        SamplingConfig(max_new_tokens=10, samples_per_prompt=samples, temperature=temperature),
        generator=torch.Generator().manual_seed(3),
    )
    lengths = exp.response_lengths
    assert int(lengths.min()) < 10 and int(lengths.max()) > 1  # some rows finished early
    assert torch.equal(exp.response_mask.sum(1), lengths)
    assert torch.equal(exp.truncated, (lengths == 10) & (exp.input_ids[:, -1] != EOS))
    rescored = _rescored(model, exp, temperature)
    assert torch.allclose(exp.behaviour_logprobs, rescored, atol=1e-5, rtol=0)
    assert bool((exp.behaviour_logprobs[exp.response_mask] < 0).all())


@pytest.mark.parametrize("lean", [True, False], ids=["lean-decode", "transformers-decode"])
def test_shared_prefill_equals_repeated_prompts(small, lean) -> None:
    """G samples of a prompt from one shared prefill have the same rows as the prompt repeated."""
    model, tokenizer = small
    engine = TransformersEngine(model, tokenizer, lean_decode=lean)
    config = SamplingConfig(max_new_tokens=6, samples_per_prompt=3)
    shared = engine.generate(_prompts(), config, generator=torch.Generator().manual_seed(5))
    repeated = [p for p in _prompts() for _ in range(3)]
    single = SamplingConfig(max_new_tokens=6, samples_per_prompt=1)
    flat = engine.generate(repeated, single, generator=torch.Generator().manual_seed(5))
    assert torch.equal(shared.input_ids, flat.input_ids)
    assert torch.allclose(shared.behaviour_logprobs, flat.behaviour_logprobs, atol=1e-6)
    assert shared.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [f["k"] for f in shared.row_fields] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_top_k_and_top_p_restrict_the_support(small) -> None:
    model, tokenizer = small
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    top2 = sampling_distribution(logits, top_k=2)
    assert torch.isfinite(top2).sum() == 2
    assert torch.allclose(top2[0, :2].exp(), torch.tensor([3.0, 2.0]).softmax(0))
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...: 0.8 needs the first two tokens
    nucleus = sampling_distribution(logits, top_p=0.8)
    assert torch.isfinite(nucleus).sum() == 2
    assert torch.allclose(nucleus[0, :2].exp(), probs[:2] / probs[:2].sum())

    prompt = Prompt("p", [2, 5, 3], {})
    with torch.no_grad():
        ranked = (
            model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1].argsort(descending=True)
        )
    exp = TransformersEngine(model, tokenizer).generate(
        [prompt],
        SamplingConfig(max_new_tokens=1, samples_per_prompt=500, top_k=2),
        generator=torch.Generator().manual_seed(0),
    )
    assert set(exp.input_ids[:, -1].tolist()) == set(ranked[:2].tolist())


def test_same_seed_same_samples_and_global_rng_untouched(small) -> None:
    model, tokenizer = small
    engine = TransformersEngine(model, tokenizer)
    config = SamplingConfig(max_new_tokens=8, samples_per_prompt=4)
    state = torch.get_rng_state()
    first = engine.generate(_prompts(), config, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), state)
    again = engine.generate(_prompts(), config, generator=torch.Generator().manual_seed(11))
    other = engine.generate(_prompts(), config, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_eos_suppression_and_training_mode_restored(small) -> None:
    model, tokenizer = small
    model.train()
    exp = TransformersEngine(model, tokenizer).generate(
        _prompts(),
        SamplingConfig(max_new_tokens=7, samples_per_prompt=2, suppress_eos=True),
        generator=torch.Generator().manual_seed(0),
    )
    assert model.training
    model.eval()
    assert exp.response_lengths.tolist() == [7] * 6
    assert bool(exp.truncated.all())
    assert not bool((exp.input_ids[:, exp.prompt_width :] == EOS).any())


def test_greedy_is_argmax_with_zero_logprobs(small) -> None:
    model, tokenizer = small
    exp = TransformersEngine(model, tokenizer).generate(
        _prompts(),
        SamplingConfig(max_new_tokens=5, temperature=0.0),
        generator=torch.Generator().manual_seed(0),
    )
    rescored = _rescored(model, exp, 1.0)
    positions = (exp.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(
            input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=positions
        ).logits
    argmax = logits[:, :-1].argmax(-1)
    response = exp.response_mask[:, 1:]
    assert torch.equal(argmax[response], exp.input_ids[:, 1:][response])
    assert bool((rescored[exp.response_mask] < 0).all())
    assert bool((exp.behaviour_logprobs == 0).all())


def test_engine_generates_with_the_model_inside_ddp(small) -> None:
    import torch.distributed as dist

    model, tokenizer = small
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        engine = TransformersEngine(wrapped, tokenizer)
        assert engine.model is model
        engine.sync_weights(wrapped)
        assert engine.model is model
    finally:
        dist.destroy_process_group()
