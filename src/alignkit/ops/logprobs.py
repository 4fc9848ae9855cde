"""Token log-probabilities and entropies from logits, without a float32 ``[B, T, V]`` copy.

Everything here works on ``[..., V]`` logits of any float dtype. Half-precision logits
(bfloat16 / float16) are upcast to float32 one block of rows at a time, so the float32 version
of the whole tensor never exists; float32 and float64 logits are computed in their own dtype.
Results are returned in that compute dtype (float32 for half-precision inputs), because the
losses built on them (importance ratios ``exp(logp - old_logp)``, KL estimates) need it.

The two reductions are custom autograd functions: their backward recomputes the softmax of
each block from the saved logits and per-row log-normaliser, instead of letting autograd keep
every float32 intermediate alive until the backward pass.

Under bf16 autocast (``precision: bf16``, ``runloop.precision``) the LM head is a bf16 matmul, so
the logits arrive in bfloat16 and carry its rounding (~0.03 nats for logits of size ~10). What
accumulates is float32 from there on: the max and log-sum-exp over the vocabulary, the gathered
log-prob, the entropy's sum over the vocabulary, the gradient ``softmax - onehot`` before it is
rounded back to the logits' dtype, and every sum over tokens made from these results (a
sequence's log-prob, the losses of ``ops``). Summing 100 log-probs of -4..0 one by one in bfloat16
errs by 1.6 nats on average (4.7 at worst, 100 trials); in float32 by < 1e-5.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from alignkit.ops._dtype import compute_dtype, map_row_blocks, rows_per_chunk

__all__ = [
    "entropy_from_logits",
    "logits_overwritable",
    "predicts_scored_mask",
    "selective_log_softmax",
    "sequence_logprobs",
    "sequence_logprobs_at",
]


def _row_block(logits: torch.Tensor, rows: torch.Tensor | None, start: int, end: int):
    """Rows ``start:end`` of the selected rows (all rows when ``rows`` is None), upcast."""
    block = logits[start:end] if rows is None else logits.index_select(0, rows[start:end])
    return block.to(compute_dtype(logits))


def _write_rows(target: torch.Tensor, rows: torch.Tensor | None, start: int, end: int, values):
    if rows is None:
        target[start:end] = values
    else:
        target.index_copy_(0, rows[start:end], values.to(target.dtype))


def _log_softmax_at(block: torch.Tensor, index: torch.Tensor):
    log_normaliser = torch.logsumexp(block, dim=-1)
    return block.gather(-1, index[:, None]).squeeze(-1) - log_normaliser, log_normaliser


def _log_softmax_at_grad(block, index, log_normaliser, upstream, out=None) -> torch.Tensor:
    # d/dz_j log softmax(z)_i = 1[j = i] - softmax(z)_j; written into `out` when given.
    upstream = upstream[:, None]
    grad = torch.sub(block, log_normaliser[:, None], out=out).exp_().mul_(-upstream)
    return grad.scatter_add_(-1, index[:, None], upstream)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[row, index[row]] for 2-D logits, optionally on a subset of rows."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        logits: torch.Tensor,  # [N, V]
        index: torch.Tensor,  # [M] int64, one token per selected row
        rows: torch.Tensor | None,  # [M] row numbers into logits, or None for all N rows
        chunk_rows: int,
        overwrite: bool = False,  # backward writes the gradient into the logits' storage
    ) -> torch.Tensor:
        out = torch.empty(index.shape[0], dtype=compute_dtype(logits), device=logits.device)
        log_normaliser = torch.empty_like(out)
        map_row_blocks(
            lambda start, end: _log_softmax_at(
                _row_block(logits, rows, start, end), index[start:end]
            ),
            (out, log_normaliser),
            index.shape[0],
            chunk_rows,
        )
        ctx.save_for_backward(logits, index, log_normaliser, rows)
        ctx.chunk_rows = chunk_rows
        ctx.overwrite = overwrite and rows is None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor):
        logits, index, log_normaliser, rows = ctx.saved_tensors
        if ctx.overwrite:
            # Each block is read before its gradient replaces it, and nothing else reads the
            # logits (checked by the caller): the gradient needs no [N, V] allocation of its own.
            grad_logits = logits.detach()
        elif rows is None:
            grad_logits = torch.empty_like(logits)
        else:
            grad_logits = torch.zeros_like(logits)
        grad_out = grad_out.to(log_normaliser.dtype)
        for start in range(0, index.shape[0], ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, index.shape[0])
            if rows is None and grad_logits.dtype == log_normaliser.dtype:
                # Straight into the output rows: no block-sized temporary, no copy.
                _log_softmax_at_grad(
                    logits[start:end],
                    index[start:end],
                    log_normaliser[start:end],
                    grad_out[start:end],
                    out=grad_logits[start:end],
                )
                continue
            _write_rows(
                grad_logits,
                rows,
                start,
                end,
                _log_softmax_at_grad(
                    _row_block(logits, rows, start, end),
                    index[start:end],
                    log_normaliser[start:end],
                    grad_out[start:end],
                ),
            )
        return grad_logits, None, None, None, None


def logits_overwritable(logits: torch.Tensor) -> bool:
    """Whether a backward may write the logits' gradient into ``logits``' own storage.

    True when ``logits`` is a non-leaf, contiguous tensor whose producing autograd node saved
    no tensor sharing its storage: the LM head's ``mm`` / ``linear`` (which saves its inputs,
    not its output), a division by a temperature, a view of either. False for a leaf (the
    caller's data), for ``tanh`` soft-capping (which saves its output) and for anything else
    that would read the logits again in its own backward. Other consumers of the same tensor
    are not visible here: the caller promises there are none.
    """
    if logits.grad_fn is None or not logits.is_contiguous():
        return False
    producers = [logits.grad_fn]
    if logits._is_view():
        if logits._base.grad_fn is None:
            return False  # a view of a leaf: the caller's data
        # A view's own node saves no tensor, but the node that made its base may save the base.
        producers.append(logits._base.grad_fn)
    storage = logits.untyped_storage().data_ptr()
    return not any(_saves_storage(node, storage) for node in producers)


def _saves_storage(node: object, storage: int) -> bool:
    for name in dir(node):
        # Built-in nodes expose each saved value as `_saved_<name>`; custom Functions' nodes
        # expose theirs as `saved_tensors`.
        if name.startswith("_saved_") or name == "saved_tensors":
            saved = getattr(node, name)
            for tensor in saved if isinstance(saved, (tuple, list)) else (saved,):
                if isinstance(tensor, torch.Tensor) and (
                    tensor.untyped_storage().data_ptr() == storage
                ):
                    return True
    return False


def _flatten_rows(logits: torch.Tensor) -> torch.Tensor:
    # A view for contiguous logits; a non-contiguous slice such as logits[:, :-1] is copied here,
    # which is why sequence_logprobs keeps the logits whole and shifts the targets instead.
    return logits.reshape(-1, logits.shape[-1])


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    chunk_size: int | None = None,
    *,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """Log-probability of one chosen class per row: ``log softmax(logits)[..., index]``.

    Computed as ``logits.gather(index) - logsumexp(logits)`` block by block over the flattened
    rows, so no ``[..., V]`` log-softmax (and, for bfloat16/float16 logits, no float32 copy of
    the whole tensor) is ever materialised. Differentiable with respect to ``logits``; the
    backward pass is chunked the same way and gives ``upstream * (onehot(index) - softmax)``.

    Args:
        logits: ``[..., V]`` unnormalised scores, any float dtype (``-inf`` allowed).
        index: ``[...]`` integer class per row, same leading shape as ``logits``.
        chunk_size: rows per block; by default about ``2**22 / V`` rows.
        overwrite_logits: let the backward write the logits' gradient into ``logits`` itself
            (same dtype, no ``[..., V]`` allocation), for logits that nothing reads after this
            call, such as the LM head's output: saves one logits-sized buffer at the peak. Only
            taken where :func:`logits_overwritable` holds (never for a leaf); the logits'
            values are gone after the backward.

    Returns:
        ``[...]`` log-probabilities in float32 (float64 for float64 logits).
    """
    if index.shape != logits.shape[:-1]:
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal logits shape without the vocabulary "
            f"dimension {tuple(logits.shape[:-1])}"
        )
    flat = _flatten_rows(logits)
    chunk_rows = rows_per_chunk(flat.shape[-1], chunk_size)
    overwrite = overwrite_logits and logits_overwritable(logits)
    out = _SelectiveLogSoftmax.apply(flat, index.reshape(-1).long(), None, chunk_rows, overwrite)
    return out.view(index.shape)


def sequence_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probabilities aligned with ``input_ids``; the one place the shift is done.

    ``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])``, read from ``logits[b, t - 1]``
    (a causal LM's logits at position ``t - 1`` predict token ``t``). Position 0 has no
    prediction and is 0; every position where ``response_mask`` is 0 is 0. Only the rows whose
    next token is in the mask are computed (prompt and padding rows cost nothing).

    Example, one sequence of 4 tokens where the last 2 are the response::

        input_ids     = [ 5,   9,   2,   7 ]
        response_mask = [ 0,   0,   1,   1 ]
        logits row    =  z0   z1   z2   z3      (z3 predicts past the end: unused)
        out           = [ 0,   0,   log softmax(z1)[2],  log softmax(z2)[7] ]

    Sum ``out`` over time (``masked_sum``) for the sequence log-probability used by DPO.

    Args:
        logits: ``[B, T, V]`` causal-LM logits for the full sequence ``input_ids``.
        input_ids: ``[B, T]`` token ids; values at masked positions are never read, so padding
            ids such as ``-100`` are allowed there.
        response_mask: ``[B, T]`` 1 (or True) for tokens to score, 0 elsewhere.
        chunk_size: rows per block, as in :func:`selective_log_softmax`.

    Returns:
        ``[B, T]`` log-probabilities (float32 for half-precision logits), 0 where unscored.
    """
    if logits.shape[:-1] != input_ids.shape or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected logits [B, T, V] with input_ids and response_mask [B, T]; got logits "
            f"{tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, response_mask "
            f"{tuple(response_mask.shape)}"
        )
    # Row t of the logits predicts token t + 1: select the rows whose *next* token is scored
    # and gather that next token, leaving the logits untouched (slicing them would copy).
    rows = predicts_scored_mask(response_mask).reshape(-1).nonzero().squeeze(-1)
    flat = _flatten_rows(logits)
    chunk_rows = rows_per_chunk(flat.shape[-1], chunk_size)
    next_ids = input_ids.reshape(-1).index_select(0, rows + 1).long()
    selected = _SelectiveLogSoftmax.apply(flat, next_ids, rows, chunk_rows)
    return _place_at_scored(selected, rows, input_ids.shape)


def predicts_scored_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool, True at ``t`` when token ``t + 1`` is scored: the logit rows that matter.

    ``predicts[b, t] = response_mask[b, t + 1] != 0`` for ``t < T - 1``, and False at ``T - 1``.
    Position 0 is nobody's next token, so a mask at position 0 selects nothing. A causal LM
    that is given this mask as ``logits_to_keep`` returns exactly these rows, in row-major
    order, as ``[N, V]`` logits for :func:`sequence_logprobs_at`.
    """
    predicts = torch.zeros(response_mask.shape, dtype=torch.bool, device=response_mask.device)
    predicts[..., :-1] = response_mask[..., 1:] != 0
    return predicts


def sequence_logprobs_at(
    selected_logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int | None = None,
    *,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """:func:`sequence_logprobs` from only the logit rows that predict a scored token.

    ``selected_logits`` is ``[N, V]``: ``logits[predicts_scored_mask(response_mask)]`` in
    row-major order, which is what a model computes when it runs its LM head only on those
    positions (cheaper by the prompt and padding share of the sequence). The result is the same
    ``[B, T]`` tensor as ``sequence_logprobs(logits, input_ids, response_mask)``.
    ``overwrite_logits`` is :func:`selective_log_softmax`'s: the LM head's output can take its
    own gradient.
    """
    predicts = predicts_scored_mask(response_mask)
    rows = predicts.reshape(-1).nonzero().squeeze(-1)
    if selected_logits.ndim != 2 or selected_logits.shape[0] != rows.shape[0]:
        raise ValueError(
            f"expected [{rows.shape[0]}, V] logits (one row per scored token), got "
            f"{tuple(selected_logits.shape)}"
        )
    chunk_rows = rows_per_chunk(selected_logits.shape[-1], chunk_size)
    next_ids = input_ids.reshape(-1).index_select(0, rows + 1).long()
    overwrite = overwrite_logits and logits_overwritable(selected_logits)
    selected = _SelectiveLogSoftmax.apply(selected_logits, next_ids, None, chunk_rows, overwrite)
    return _place_at_scored(selected, rows, input_ids.shape)


def _place_at_scored(selected: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape.numel(), dtype=selected.dtype, device=selected.device)
    # Row r predicts token r + 1 (never across sequences: the last row of each is unselected).
    out = out.index_put((rows + 1,), selected)
    return out.view(shape)


def _log_p_and_p(block: torch.Tensor, log_normaliser: torch.Tensor):
    log_p = block - log_normaliser[:, None]
    return log_p, torch.exp(log_p)


# In both terms below a -inf logit (top-k masking) has p = 0 and log p = -inf, so p * (...) is
# 0 * -inf = NaN, which is set to its limit 0 (0 log 0 = 0); for finite logits no other NaN
# arises. nan_to_num is one vectorised pass: a boolean torch.where over [N, V] is ~20x slower
# on CPU.


def _entropy(block: torch.Tensor):
    log_normaliser = torch.logsumexp(block, dim=-1)
    log_p, p = _log_p_and_p(block, log_normaliser)
    return -(p * log_p).nan_to_num_(nan=0.0).sum(-1), log_normaliser


def _entropy_grad(block, log_normaliser, entropy, upstream) -> torch.Tensor:
    # dH/dz_j = -p_j (log p_j + H)
    log_p, p = _log_p_and_p(block, log_normaliser)
    return (p * (log_p + entropy[:, None])).nan_to_num_(nan=0.0).mul_(-upstream[:, None])


class _EntropyFromLogits(torch.autograd.Function):
    """Softmax entropy per row of 2-D logits."""

    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        entropy = torch.empty(logits.shape[0], dtype=compute_dtype(logits), device=logits.device)
        log_normaliser = torch.empty_like(entropy)
        map_row_blocks(
            lambda start, end: _entropy(_row_block(logits, None, start, end)),
            (entropy, log_normaliser),
            logits.shape[0],
            chunk_rows,
        )
        ctx.save_for_backward(logits, log_normaliser, entropy)
        ctx.chunk_rows = chunk_rows
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor):
        logits, log_normaliser, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        grad_out = grad_out.to(entropy.dtype)
        map_row_blocks(
            lambda start, end: (
                _entropy_grad(
                    _row_block(logits, None, start, end),
                    log_normaliser[start:end],
                    entropy[start:end],
                    grad_out[start:end],
                ),
            ),
            (grad_logits,),
            logits.shape[0],
            ctx.chunk_rows,
        )
        return grad_logits, None


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension, in nats.

    ``H = logsumexp(z) - sum_j p_j z_j = -sum_j p_j log p_j`` with ``p = softmax(z)``. The
    second form is used: every term has the same sign, so nothing large cancels, and
    ``0 log 0 = 0`` handles ``-inf`` logits. Computed block by block over rows in float32 (or
    float64), differentiable, with a chunked backward ``dH/dz_j = -p_j (log p_j + H)``.

    Args:
        logits: ``[..., V]`` unnormalised scores, any float dtype.
        chunk_size: rows per block; by default about ``2**22 / V`` rows.

    Returns:
        ``[...]`` entropies in float32 (float64 for float64 logits).
    """
    flat = _flatten_rows(logits)
    chunk_rows = rows_per_chunk(flat.shape[-1], chunk_size)
    return _EntropyFromLogits.apply(flat, chunk_rows).view(logits.shape[:-1])
