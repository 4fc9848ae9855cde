"""The gradient of a tied input/output embedding, accumulated in place.

With ``tie_word_embeddings`` one ``[V, H]`` weight is both the input embedding and the LM head,
and autograd gives it two gradients: the LM head's dense ``g^T h`` and the embedding's, which
``embedding_dense_backward`` builds as a fresh zero ``[V, H]`` tensor with a few rows added.
The two are then summed into a third fresh ``[V, H]`` tensor (113 MB for SmolLM2's 49k x 576),
and on CPU each fresh tensor costs its page faults on top of the memory traffic.

:func:`accumulate_tied_embedding_grad` routes both uses through two autograd functions that
share one slot per weight. The LM head's backward (which runs first: the embedding feeds it)
computes its gradient as usual and leaves it in the slot; the embedding's backward adds its
rows into that tensor in place (``index_add_``, pad rows skipped as ``padding_idx`` says) and
returns no gradient of its own. Autograd then accumulates the one tensor into ``.grad`` as it
would have accumulated the sum. If the LM head did not run in a backward pass (no slot), the
embedding returns its ordinary dense gradient; the slot is cleared at the end of every
backward pass. The gradient is the same sum, up to float addition order.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

__all__ = ["accumulate_tied_embedding_grad"]


class _Slot:
    """The LM head's gradient of the current backward pass, waiting for the embedding's rows."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    def clear(self) -> None:
        self.grad = None


class _TiedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, hidden: Tensor, weight: Tensor, slot: _Slot) -> Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.slot = slot  # type: ignore[attr-defined]
        return F.linear(hidden, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        hidden, weight = ctx.saved_tensors
        # Under autocast the forward ran in a lower precision: grads in the inputs' dtypes.
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_out @ weight.to(grad_out.dtype)).to(hidden.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            flat_out = grad_out.reshape(-1, grad_out.shape[-1])
            flat_hidden = hidden.reshape(-1, hidden.shape[-1]).to(flat_out.dtype)
            grad_weight = flat_out.t().mm(flat_hidden).to(weight.dtype)
            if ctx.slot.grad is None:
                ctx.slot.grad = grad_weight
                torch.autograd.Variable._execution_engine.queue_callback(ctx.slot.clear)
        return grad_hidden, grad_weight, None


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, ids: Tensor, weight: Tensor, padding_idx: int | None, slot: _Slot
    ) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]  # type: ignore[attr-defined]
        ctx.padding_idx = padding_idx  # type: ignore[attr-defined]
        ctx.slot = slot  # type: ignore[attr-defined]
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor | None, None, None]:
        (ids,) = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        flat_ids = ids.reshape(-1)
        if ctx.padding_idx is not None:
            rows = rows.masked_fill((flat_ids == ctx.padding_idx)[:, None], 0.0)
        target = ctx.slot.grad
        if target is not None and target.dtype == rows.dtype:
            ctx.slot.clear()  # released before accumulation, so autograd may take it as .grad
            target.index_add_(0, flat_ids, rows)
            return None, None, None, None
        dense = rows.new_zeros(ctx.num_weights, rows.shape[-1]).index_add_(0, flat_ids, rows)
        return None, dense, None, None


def accumulate_tied_embedding_grad(model: nn.Module) -> bool:
    """Make ``model``'s tied input/output embedding accumulate its gradient in place.

    Rebinds the ``forward`` of the input embedding and the LM head (those instances only) when
    they share one weight, the embedding is a plain ``nn.Embedding`` (no ``max_norm``,
    ``scale_grad_by_freq`` or sparse gradient) and the head a plain bias-free ``nn.Linear``.
    Without grad mode, or with the weight frozen, both run their usual forward. Returns whether
    it is installed (False for untied models, which need nothing).
    """
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_input) or not callable(get_output):
        return False
    embedding, head = get_input(), get_output()
    if type(embedding) is not nn.Embedding or type(head) is not nn.Linear:
        return False
    if head.weight is not embedding.weight or head.bias is not None:
        return False
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return False
    if getattr(embedding, "_alignkit_tied_slot", None) is None:
        # One slot shared by both modules; bound methods, so a deep copy rebinds to the copy.
        embedding._alignkit_tied_slot = head._alignkit_tied_slot = _Slot()  # type: ignore[assignment]
        embedding.forward = types.MethodType(_tied_embedding_forward, embedding)  # type: ignore[method-assign]
        head.forward = types.MethodType(_tied_head_forward, head)  # type: ignore[method-assign]
    return True


def _tied_embedding_forward(self: nn.Embedding, ids: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and self.weight.requires_grad):
        return nn.Embedding.forward(self, ids)
    return _TiedEmbedding.apply(ids, self.weight, self.padding_idx, self._alignkit_tied_slot)


def _tied_head_forward(self: nn.Linear, hidden: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and self.weight.requires_grad):
        return nn.Linear.forward(self, hidden)
    return _TiedHead.apply(hidden, self.weight, self._alignkit_tied_slot)
