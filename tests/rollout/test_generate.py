"""The generation front-end: order, batching invariance, decoding settings, JSONL rows."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.synthetic import SyntheticTask
from alignkit.models import load_policy
from alignkit.rollout import SamplingConfig, generate_responses


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=3)


def test_batched_greedy_equals_one_prompt_at_a_time(tiny) -> None:
    model, tokenizer = tiny
    prompts = SyntheticTask(seed=0).prompts("heldout")[:12]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    one_by_one = generate_responses(model, tokenizer, prompts, greedy, prompts_per_batch=1)
    batched = generate_responses(model, tokenizer, prompts, greedy, prompts_per_batch=5)
    assert batched == one_by_one
    assert len(set(batched)) > 1  # different prompts, different continuations: order matters


def test_sampling_is_reproducible_with_a_seed(tiny) -> None:
    model, tokenizer = tiny
    prompts = ["how do I bake bread?"] * 4
    settings = SamplingConfig(max_new_tokens=6, temperature=1.0)
    state = torch.get_rng_state()
    first = generate_responses(model, tokenizer, prompts, settings, generator_seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator, no global reseed
    again = generate_responses(model, tokenizer, prompts, settings, generator_seed=7)
    assert first == again
    assert len(set(first)) > 1  # a random tiny model samples different continuations


def test_generation_restores_training_mode_and_handles_empty_input(tiny) -> None:
    model, tokenizer = tiny
    model.train()
    assert generate_responses(model, tokenizer, []) == []
    generate_responses(model, tokenizer, ["hello"], SamplingConfig(2, temperature=0))
    assert model.training
    model.eval()


def test_settings_are_validated(tiny) -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingConfig(max_new_tokens=1, top_p=0.0)
    with pytest.raises(ValueError, match="prompts_per_batch must be >= 1"):
        generate_responses(*tiny, ["hello"], prompts_per_batch=0)


def test_generate_batched_returns_rows_in_the_callers_order(tiny, tmp_path) -> None:
    import json

    from alignkit.rollout import (
        TransformersEngine,
        completion_rows,
        generate_batched,
        prompts_from_records,
        write_completions,
    )

    model, tokenizer = tiny
    texts = SyntheticTask(seed=0).prompts("heldout")[:7]
    prompts = prompts_from_records([{"prompt": t, "k": i} for i, t in enumerate(texts)], tokenizer)
    by_length = sorted(range(7), key=lambda i: len(prompts[i].input_ids))
    assert by_length != list(range(7))  # batching by length reorders them
    engine = TransformersEngine(model, tokenizer)
    greedy = SamplingConfig(max_new_tokens=5, samples_per_prompt=2, temperature=0.0)
    progress: list[tuple[int, int]] = []
    batched = generate_batched(
        engine,
        prompts,
        greedy,
        prompts_per_batch=3,
        generator=torch.Generator(),
        on_progress=lambda done, total: progress.append((done, total)),
    )
    whole = generate_batched(
        engine, prompts, greedy, prompts_per_batch=7, generator=torch.Generator()
    )
    assert progress == [(3, 7), (6, 7), (7, 7)]
    assert (
        batched.group_index.tolist()
        == whole.group_index.tolist()
        == [i for i in range(7) for _ in range(2)]
    )
    assert [f["k"] for f in batched.row_fields] == [i for i in range(7) for _ in range(2)]
    assert batched.completions == whole.completions and batched.prompts == whole.prompts
    assert torch.equal(batched.response_lengths, whole.response_lengths)
    rows = completion_rows(batched, logprobs=True)
    assert [r["sample"] for r in rows[:4]] == [0, 1, 0, 1] and rows[2]["k"] == 1
    assert all(r["logprobs"] == [0.0] * r["num_tokens"] for r in rows)  # greedy: a point mass
    assert write_completions(tmp_path / "out.jsonl", batched) == 14
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == completion_rows(batched)
