"""models.forward: token log-probs with temperature, mask positions, scored rows, any wrapper."""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from alignkit.models import LoraSettings, load_policy, wrappers
from alignkit.models import forward as forward_module
from alignkit.models.forward import (
    innermost_model,
    position_ids_from_mask,
    response_logps,
    selects_logit_rows,
    token_logprobs,
)

VOCAB = 1024  # the tiny preset's


def _right_padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    response_mask = torch.zeros_like(input_ids)
    response_mask[0, 4:] = 1
    response_mask[1, 8:] = 1
    response_mask[2, 5:7] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }


def _left_padded(sequences: list[list[int]], prompt_lengths: list[int], pad_id: int = 0):
    """A rollout-shaped batch: each sequence left-padded; its tokens after the prompt scored."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (tokens, prompt) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        start = width - len(tokens)
        input_ids[row, start:] = torch.tensor(tokens)
        attention_mask[row, start:] = 1
        response_mask[row, start + prompt :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }


def _ragged_sequences(vocab: int) -> tuple[list[list[int]], list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths, prompts = [9, 5, 7], [3, 2, 4]
    sequences = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    return sequences, prompts


@pytest.fixture
def full_logits_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Force the fallback that computes every position's logits."""
    monkeypatch.setattr(forward_module, "selects_logit_rows", lambda model: False)
    yield


def _outputs_and_grads(model: nn.Module, batch, temperature: float) -> list[torch.Tensor]:
    model.zero_grad()
    logps, entropy = token_logprobs(
        model, batch, batch["response_mask"], temperature=temperature, with_entropy=True
    )
    (logps.sum() + 0.5 * entropy.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    return [logps.detach(), entropy.detach(), *grads]


@pytest.mark.parametrize(
    ("temperature", "use_lora", "left_padding"),
    [(1.0, False, False), (0.7, False, True), (1.3, True, True)],
)
def test_scored_rows_path_equals_the_full_logits_path(
    monkeypatch: pytest.MonkeyPatch, temperature: float, use_lora: bool, left_padding: bool
) -> None:
    model, _ = load_policy("tiny", seed=0, lora=LoraSettings(r=2, alpha=4.0) if use_lora else None)
    batch = _left_padded(*_ragged_sequences(VOCAB)) if left_padding else _right_padded_batch()
    assert selects_logit_rows(model)
    selected = _outputs_and_grads(model, batch, temperature)
    monkeypatch.setattr(forward_module, "selects_logit_rows", lambda model: False)
    full = _outputs_and_grads(model, batch, temperature)
    assert len(selected) == len(full)
    for a, b in zip(selected, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unscored = batch["response_mask"] == 0
    assert (selected[0][unscored] == 0).all() and (selected[1][unscored] == 0).all()
    assert (selected[1][~unscored] > 0).all()  # entropies of a random model are positive


@pytest.mark.usefixtures("full_logits_path")
def test_temperature_divides_the_logits_before_the_log_softmax() -> None:
    model, _ = load_policy("tiny", seed=0)
    batch = _left_padded(*_ragged_sequences(VOCAB))
    scored, temperature = batch["response_mask"].bool(), 0.6
    with torch.no_grad():
        logps, entropy = token_logprobs(
            model, batch, scored, temperature=temperature, with_entropy=True
        )
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_from_mask(batch["attention_mask"]),
        ).logits.double()
    log_p = torch.log_softmax(logits / temperature, dim=-1)  # [B, T, V], float64, by hand
    expected_logps = torch.zeros_like(logps, dtype=torch.float64)
    expected_entropy = torch.zeros_like(expected_logps)
    for b, t in scored.nonzero().tolist():
        expected_logps[b, t] = log_p[b, t - 1, batch["input_ids"][b, t]]
        expected_entropy[b, t] = -(log_p[b, t - 1].exp() * log_p[b, t - 1]).sum()
    torch.testing.assert_close(logps.double(), expected_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=0, atol=1e-5)
    # The temperature changes the numbers (the test would catch it being ignored).
    plain = token_logprobs(model, batch, scored).detach()
    assert (plain - logps).abs().max() > 1e-2


def test_temperature_must_be_positive() -> None:
    model, _ = load_policy("tiny", seed=0)
    batch = _right_padded_batch()
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        token_logprobs(model, batch, batch["response_mask"], temperature=0)


def test_position_ids_from_mask_counts_from_the_first_real_token() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)
    assert torch.equal(position_ids_from_mask(mask.bool()), expected)


def _tiny_gpt2() -> nn.Module:
    # Learned absolute position embeddings: wrong positions change the outputs a lot.
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_left_padded_rows_score_as_their_unpadded_sequences(architecture: str) -> None:
    if architecture == "llama":
        model, vocab = load_policy("tiny", seed=0)[0].eval(), VOCAB
    else:
        model, vocab = _tiny_gpt2(), 64
    sequences, prompts = _ragged_sequences(vocab)
    batch = _left_padded(sequences, prompts)
    with torch.no_grad():
        padded = token_logprobs(model, batch, batch["response_mask"])
        for row, (tokens, prompt) in enumerate(zip(sequences, prompts, strict=True)):
            alone = _left_padded([tokens], [prompt])  # no padding at all
            expected = token_logprobs(model, alone, alone["response_mask"])[0]
            torch.testing.assert_close(padded[row, -len(tokens) :], expected, rtol=0, atol=1e-5)
        if architecture == "gpt2":  # default positions 0..T-1 would shift the padded rows
            arange = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
            shifted = token_logprobs(model, batch, batch["response_mask"], position_ids=arange)
            assert (shifted - padded).abs().max() > 1e-2


def _logit_rows_seen(model: nn.Module, lm_head: nn.Module, batch) -> list[torch.Size]:
    rows_seen: list[torch.Size] = []
    hook = lm_head.register_forward_hook(lambda m, i, out: rows_seen.append(out.shape))
    try:
        token_logprobs(model, batch, batch["response_mask"])
    finally:
        hook.remove()
    return rows_seen


def test_lm_head_runs_on_the_scored_rows_only() -> None:
    model, _ = load_policy("tiny", seed=0)
    batch = _right_padded_batch()
    # Row 0 scores 6 tokens, row 1 scores 2, row 2 scores 2: 10 logit rows, not 3 x 10.
    assert _logit_rows_seen(model, model.lm_head, batch) == [torch.Size([10, VOCAB])]


@pytest.mark.usefixtures("single_process_group")
def test_fast_path_is_found_inside_distributed_data_parallel() -> None:
    model, _ = load_policy("tiny", seed=0)
    wrapped = nn.parallel.DistributedDataParallel(model)
    batch = _right_padded_batch()
    assert innermost_model(wrapped) is model
    assert selects_logit_rows(wrapped)
    assert _logit_rows_seen(wrapped, model.lm_head, batch) == [torch.Size([10, VOCAB])]
    torch.testing.assert_close(
        response_logps(wrapped, batch), response_logps(model, batch), rtol=0, atol=0
    )


def test_fast_path_is_found_inside_peft_and_a_module_wrapper() -> None:
    model, _ = load_policy("tiny", seed=0, lora=LoraSettings(r=2, alpha=4.0))
    base = model.get_base_model()
    assert isinstance(base, LlamaForCausalLM)
    assert innermost_model(model) is base
    assert selects_logit_rows(model)
    batch = _right_padded_batch()
    assert _logit_rows_seen(model, base.lm_head, batch) == [torch.Size([10, VOCAB])]

    class EngineLike(nn.Module):  # DeepSpeed's engine and FSDP1 hold the model as `.module`
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    assert innermost_model(EngineLike(EngineLike(model))) is base
    assert selects_logit_rows(EngineLike(model))


def test_fast_path_is_decided_by_the_class_that_defines_forward() -> None:
    model, _ = load_policy("tiny", seed=0)

    class FSDPMixin:  # FSDP2's fully_shard swaps in a generated subclass of this shape
        pass

    fsdp2_class = type("FSDPLlamaForCausalLM", (FSDPMixin, LlamaForCausalLM), {})
    assert wrappers._selects_logit_rows(fsdp2_class)
    assert selects_logit_rows(torch.compile(model))  # peeled without compiling anything

    class RemoteCodeLM(LlamaForCausalLM):  # overrides forward: its logits_to_keep is unknown
        def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **kwargs):
            raise AssertionError("not called")

    class PlainLM(nn.Module):
        def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
            raise AssertionError("not called")

    assert not wrappers._selects_logit_rows(RemoteCodeLM)
    assert not selects_logit_rows(PlainLM())


def test_models_without_position_ids_get_none() -> None:
    seen: list[set[str]] = []

    class AlibiLikeLM(nn.Module):  # like BLOOM / MPT: positions come from the mask inside
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.head = nn.Linear(8, VOCAB)

        def forward(self, input_ids, attention_mask=None, **kwargs):
            seen.append(set(kwargs))
            return types.SimpleNamespace(logits=self.head(self.embed(input_ids)))

    batch = _left_padded(*_ragged_sequences(VOCAB))
    logps = token_logprobs(AlibiLikeLM(), batch, batch["response_mask"])
    assert seen == [set()]
    assert (logps[batch["response_mask"].bool()] < 0).all()
