"""Attention of a packed row computed sequence by sequence, one SDPA call per piece.

A packed row (`models.packing`) holds many sequences end to end. With one ``[L, L]`` mask,
masked attention computes every (query, key) pair of the row, ``L**2``, although a sequence only
sees itself: packing a step's rows into one row would trade padding for quadratic attention, so
the masked layout spreads them over several padded rows instead. Here each row's own tokens (an
:class:`AttentionBlock`) attend on their own:

- a sequence with no shared prefix: ``scaled_dot_product_attention(..., is_causal=True)`` over
  its positions, no mask;
- a sequence whose prefix is computed once by an earlier row (a DPO pair's rejected answer
  after the chosen one, a GRPO group's later completions): its queries against the keys of its
  whole sequence, gathered (the shared prefix's positions, then its own), with a causal mask
  offset by the prefix length.

Attention then costs about ``sum(own_tokens * sequence_length)`` (``T**2 / 2`` per unshared
sequence of ``T``) instead of ``L**2``, never reads a sibling's keys, builds no ``[L, L]`` mask,
and the whole step fits in one row without padding. Grouped-query attention runs without
repeating the key/value heads (``enable_gqa``). Same outputs as the masked forward to float32
round-off (tested).

The model's attention layers find this function through transformers' ``AttentionInterface``:
:func:`block_attention` switches the model's ``_attn_implementation`` to it for the duration of
a forward, and the blocks travel as the ``alignkit_blocks`` keyword argument that transformers
passes through to the attention function. Without that argument it is plain ``sdpa``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.models.bf16_attention import (
    register_sdpa_with_float32_backward,
    with_float32_backward,
)
from alignkit.models.wrappers import innermost_model

__all__ = ["BLOCK_SDPA", "AttentionBlock", "block_attention", "block_attention_available"]

#: The name the attention function is registered under.
BLOCK_SDPA = "alignkit_block_sdpa"
# Keyword arguments of other attention variants that this function does not implement.
_UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks")


@dataclass(frozen=True)
class AttentionBlock:
    """The queries at positions ``start:end`` of the packed row and the keys they may see.

    ``keys`` None: the keys are the same positions, causally (one sequence on its own). Else
    ``keys`` ``[k]`` are the packed positions of the keys (in sequence order) and ``visible``
    ``[end - start, k]`` bool says which of them each query sees.
    """

    start: int
    end: int
    keys: Tensor | None = None
    visible: Tensor | None = None


def block_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    alignkit_blocks: tuple[AttentionBlock, ...] | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[1, H, L, D]``, ``key`` and
    ``value`` ``[1, H_kv, L, D]``; returns ``[1, L, H, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if alignkit_blocks is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    unsupported = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported or attention_mask is not None or query.shape[0] != 1:
        raise ValueError(
            f"block attention runs one packed row without a mask or {', '.join(_UNSUPPORTED)}; "
            f"{type(module).__name__} passed "
            f"{unsupported or ('a mask' if attention_mask is not None else 'several rows')}"
        )
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for block in alignkit_blocks:
        if block.keys is None:
            block_key = key[:, :, block.start : block.end]
            block_value = value[:, :, block.start : block.end]
        else:
            block_key = key.index_select(2, block.keys)
            block_value = value.index_select(2, block.keys)
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, block.start : block.end],
                block_key,
                block_value,
                attn_mask=block.visible,
                dropout_p=dropout,
                is_causal=block.keys is None,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return output.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    # Both under bf16 autocast on CPU: bf16 forward, float32 backward (models.bf16_attention).
    AttentionInterface.register(BLOCK_SDPA, with_float32_backward(block_sdpa_attention))
    register_sdpa_with_float32_backward()


_register()


def block_attention_available(model: nn.Module) -> bool:
    """Whether :func:`block_attention` can run ``model`` (its innermost module): sdpa attention,
    one config shared by every submodule (so switching it reaches every attention layer), and no
    gradient checkpointing (its recomputation would run after the switch is undone)."""
    inner = innermost_model(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    checkpointing = getattr(type(inner), "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.x
        checkpointing = getattr(type(inner), "is_gradient_checkpointing", None)
    if isinstance(checkpointing, property) and checkpointing.fget(inner):
        return False
    shared = _ONE_CONFIG.get(inner)
    if shared is None:  # scanned once per model
        shared = _ONE_CONFIG[inner] = all(
            getattr(m, "config", config) is config for m in inner.modules()
        )
    return shared


_ONE_CONFIG: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@contextmanager
def block_attention(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Run ``model``'s attention layers through :func:`block_sdpa_attention` inside the block
    (a no-op when not ``active``)."""
    if not active:
        yield
        return
    config = innermost_model(model).config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = BLOCK_SDPA
    try:
        yield
    finally:
        config._attn_implementation_internal = previous
