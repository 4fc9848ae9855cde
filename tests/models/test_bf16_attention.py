"""Attention under bf16 autocast on CPU: bf16 forward, float32 backward (models.bf16_attention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from alignkit.models.bf16_attention import with_float32_backward
from alignkit.models.tiny import build_tiny_model, load_tiny_tokenizer


class _Module:
    num_key_value_groups = 3
    is_causal = True


def _inputs(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, 9, 40, 16), (1, 3, 40, 16), (1, 3, 40, 16)]
    return [torch.randn(s, generator=generator).requires_grad_() for s in shapes]


def _attend(fn, inputs, **kwargs):
    out, _ = fn(_Module(), *inputs, None, scaling=0.25, **kwargs)
    grad = torch.full_like(out, 2.0**-12)  # exact in bf16 too
    return out, torch.autograd.grad(out, inputs, grad)


def test_forward_is_autocasts_and_the_backward_the_float32_gradient_at_the_bf16_inputs():
    inputs = _inputs()
    wrapped = with_float32_backward(sdpa_attention_forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _attend(wrapped, inputs)
        plain_out, plain_grads = _attend(sdpa_attention_forward, inputs)
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain_out)
    # The reference: float32 attention of the bf16-rounded inputs, differentiated.
    rounded = [t.detach().bfloat16().float().requires_grad_() for t in inputs]
    _, want = _attend(sdpa_attention_forward, rounded)
    for got, plain, reference in zip(grads, plain_grads, want, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7)
        # The bf16 kernel's own gradient is further from it.
        assert (plain.float() - reference).abs().max() > 10 * (got - reference).abs().max()


def test_outside_bf16_training_on_cpu_the_wrapped_function_is_called_as_it_is():
    calls = []

    def spy(module, query, key, value, mask, dropout=0.0, **kwargs):
        calls.append(query.dtype)
        return F.scaled_dot_product_attention(query, key, value, enable_gqa=True), None

    wrapped = with_float32_backward(spy)
    inputs = _inputs()
    wrapped(_Module(), *inputs, None)  # float32: once
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped(_Module(), *inputs, None)  # no gradient: once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped(_Module(), *inputs, None, dropout=0.1)  # dropout: once
        out, _ = wrapped(_Module(), *inputs, None)  # forward, then the backward's recompute
        out.float().sum().backward()
    assert calls == [torch.float32] * 3 + [torch.bfloat16, torch.float32]


def test_models_use_it_through_the_sdpa_name(monkeypatch):
    model = build_tiny_model(load_tiny_tokenizer()).train()
    assert model.config._attn_implementation == "sdpa"
    registered = AttentionInterface._global_mapping["sdpa"]
    assert registered.__wrapped__ is sdpa_attention_forward
    ids = torch.randint(7, 1000, (2, 24), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss, grads = step()
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_attention_forward)
    plain_loss, plain_grads = step()
    assert torch.equal(loss, plain_loss)  # the same forward
    relative = (grads - plain_grads).norm() / plain_grads.norm()
    assert 0 < relative < 2e-2  # other (float32) rounding in the attention backward only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_weights_without_autocast_take_it_too(dtype):
    inputs = [t.detach().to(dtype).requires_grad_() for t in _inputs(1)]
    out, grads = _attend(with_float32_backward(sdpa_attention_forward), inputs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
