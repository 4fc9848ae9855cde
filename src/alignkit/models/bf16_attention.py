"""Attention under bf16 autocast on CPU: the bf16 forward kernel, a float32 backward.

torch's CPU flash-attention backward is several times slower in bfloat16 than in float32, while
its bfloat16 forward is faster (torch 2.13, one thread, SmolLM2-135M's 9 query and 3 key/value
heads of 64: causal attention over 128 tokens took 12-20 ms forward + backward in bf16 against
2-5 ms in fp32; in a SmolLM2 training step of 4 x 128 tokens attention was 23-26% of the bf16
step's CPU time, 4-5% of the fp32 step's). :func:`with_float32_backward` wraps a transformers
attention function so that, under bf16 autocast on CPU with gradients on, its forward runs as
autocast would run it (bf16, the same numbers) and its backward recomputes the attention in
float32 from the same bf16-rounded queries, keys and values and differentiates that: attention
took 11-13% of the same step (measured with ``torch.profiler``), and its gradient is the exact
float32 gradient at the bf16 inputs rather than the bf16 kernel's.

alignkit registers the wrapped function under transformers' own ``"sdpa"`` name (and its packed
``alignkit_block_sdpa``), so every model with sdpa attention gets it, and every check of
``_attn_implementation == "sdpa"`` still holds. Outside that case (float32, GPUs, no gradient,
dropout) the wrapped function is called as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["register_sdpa_with_float32_backward", "with_float32_backward"]

AttentionFn = Callable[..., tuple[Tensor, Any]]


def _bf16_training_on_cpu(query: Tensor, key: Tensor, value: Tensor, dropout: float) -> bool:
    if query.device.type != "cpu" or dropout or not torch.is_grad_enabled():
        return False
    if not (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    autocast = (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return autocast or query.dtype == torch.bfloat16


class _Float32Backward(torch.autograd.Function):
    """``attend(q, k, v)`` forward in bf16, backward through its float32 recomputation."""

    @staticmethod
    def forward(ctx: Any, attend: Callable, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        rounded = [t.to(torch.bfloat16) for t in (query, key, value)]
        ctx.attend, ctx.dtypes = attend, [t.dtype for t in (query, key, value)]
        ctx.save_for_backward(*rounded)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return attend(*rounded)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor, Tensor]:
        inputs = [t.detach().float().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            output = ctx.attend(*inputs)
            grads = torch.autograd.grad(output, inputs, grad.float())
        return (None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)))


def with_float32_backward(attention: AttentionFn) -> AttentionFn:
    """``attention`` (transformers' signature: ``(module, query, key, value, attention_mask,
    dropout=0.0, ...) -> (output, weights)``) with the float32 backward of the module docstring
    under bf16 autocast on CPU; unchanged elsewhere. The attention weights are not returned
    in that case (sdpa returns none anyway)."""

    @functools.wraps(attention)
    def wrapped(
        module: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        if not _bf16_training_on_cpu(query, key, value, dropout):
            return attention(module, query, key, value, attention_mask, dropout=dropout, **kwargs)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return attention(module, q, k, v, attention_mask, dropout=dropout, **kwargs)[0]

        return _Float32Backward.apply(attend, query, key, value), None

    return wrapped


def register_sdpa_with_float32_backward() -> None:
    """Register :func:`with_float32_backward` of transformers' sdpa under ``"sdpa"`` (once)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    current = AttentionInterface._global_mapping.get("sdpa")
    if getattr(current, "__wrapped__", None) is not sdpa_attention_forward:
        AttentionInterface.register("sdpa", with_float32_backward(sdpa_attention_forward))
