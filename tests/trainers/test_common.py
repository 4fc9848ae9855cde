from __future__ import annotations

import pytest
import torch
from torch import nn

from alignkit.models import LoraSettings, load_policy
from alignkit.trainers import common
from alignkit.trainers.common import response_logps, selects_logit_rows, token_logprobs


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0  # right padding
    response_mask = torch.zeros_like(input_ids)
    response_mask[0, 4:] = 1
    response_mask[1, 8:] = 1
    response_mask[2, 5:7] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }


def _logps_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    model.zero_grad()
    logps = response_logps(model, batch)
    logps.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return logps.detach(), *grads


def test_lm_head_on_scored_rows_only_gives_the_full_logits_values_and_gradients(monkeypatch):
    model, _ = load_policy("tiny", seed=0)
    batch = _batch(model.config.vocab_size)
    assert selects_logit_rows(model)
    selected = _logps_and_grads(model, batch)

    monkeypatch.setattr(common, "selects_logit_rows", lambda model: False)
    full = _logps_and_grads(model, batch)
    assert len(selected) == len(full)
    for a, b in zip(selected, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lm_head_runs_on_the_scored_rows_only():
    model, _ = load_policy("tiny", seed=0)
    batch = _batch(model.config.vocab_size)
    rows_seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: rows_seen.append(out.shape))
    try:
        token_logprobs(model, batch, batch["response_mask"])
    finally:
        hook.remove()
    # Row 0 scores 6 tokens, row 1 scores 2, row 2 scores 2: 10 logit rows, not 3 x 10.
    assert rows_seen == [torch.Size([10, model.config.vocab_size])]


def test_selects_logit_rows_sees_through_peft_and_refuses_models_outside_transformers():
    lora_model, _ = load_policy("tiny", seed=0, lora=LoraSettings(r=2, alpha=4.0))
    assert selects_logit_rows(lora_model)

    class RemoteCodeLM(nn.Module):
        def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
            raise AssertionError("not called")

    assert not selects_logit_rows(RemoteCodeLM())


@pytest.mark.parametrize("use_lora", [False, True])
def test_token_logprobs_with_lora_matches_the_full_path(monkeypatch, use_lora):
    lora = LoraSettings(r=2, alpha=4.0) if use_lora else None
    model, _ = load_policy("tiny", seed=0, lora=lora)
    batch = _batch(1024)
    selected = token_logprobs(model, batch, batch["response_mask"])
    monkeypatch.setattr(common, "selects_logit_rows", lambda model: False)
    full = token_logprobs(model, batch, batch["response_mask"])
    torch.testing.assert_close(selected, full, rtol=1e-5, atol=1e-6)
    assert (selected[batch["response_mask"] == 0] == 0).all()
