from __future__ import annotations

import math

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from alignkit.ops import _dtype
from alignkit.ops.logprobs import (
    entropy_from_logits,
    logits_overwritable,
    predicts_scored_mask,
    selective_log_softmax,
    sequence_logprobs,
    sequence_logprobs_at,
)


def naive_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return log_probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return -(log_probs.exp() * log_probs).sum(-1)


def peak_allocated_bytes(fn) -> int:
    """Peak bytes held by tensors allocated while ``fn`` runs, on the CPU.

    There is no CPU counterpart of ``torch.cuda.max_memory_allocated``, so this replays the
    profiler's record of every CPU allocator call (``profile_memory=True``): each allocation and
    free is an event with a signed size, including temporaries freed inside one ATen kernel
    (e.g. the ``exp`` buffer inside ``logsumexp``), which a dispatch-level tracker cannot see.
    The running sum over those events in time order is the live memory; its maximum is the
    peak. The sizes are exact and deterministic (timing only orders the events).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = [node for node in walk(tree) if node.tag == _EventType.Allocation]
    assert allocations, "the profiler recorded no allocations"
    live = peak = 0
    for node in sorted(allocations, key=lambda node: node.start_time_ns):
        live += node.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


# --- selective_log_softmax ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7, 1000])
def test_selective_log_softmax_equals_naive_gather_in_float32(chunk_size):
    logits = torch.randn(3, 5, 50) * 4
    index = torch.randint(0, 50, (3, 5))
    result = selective_log_softmax(logits, index, chunk_size=chunk_size)
    assert result.shape == (3, 5) and result.dtype == torch.float32
    torch.testing.assert_close(
        result, naive_selective_log_softmax(logits, index), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_on_half_precision_computes_in_float32(dtype):
    logits = (torch.randn(4, 6, 300) * 6).to(dtype)
    index = torch.randint(0, 300, (4, 6))
    result = selective_log_softmax(logits, index, chunk_size=5)
    assert result.dtype == torch.float32
    # Reference: float32 maths on the very same half-precision values.
    reference = naive_selective_log_softmax(logits.float(), index)
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5)
    # Doing the maths in half precision would be visibly worse; make sure we are not doing that.
    half_precision = torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1)
    assert (half_precision.float() - reference).abs().max() > 10 * (result - reference).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_gradient_equals_naive_gradient(dtype):
    base = torch.randn(2, 7, 40) * 3
    index = torch.randint(0, 40, (2, 7))
    upstream = torch.randn(2, 7)

    logits = base.to(dtype).requires_grad_()
    (selective_log_softmax(logits, index, chunk_size=3) * upstream).sum().backward()

    reference = base.to(dtype).float().requires_grad_()
    (naive_selective_log_softmax(reference, index) * upstream).sum().backward()

    assert logits.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 rounding of the gradient
    torch.testing.assert_close(logits.grad.float(), reference.grad, rtol=tolerance, atol=tolerance)


def test_selective_log_softmax_passes_gradcheck_in_float64():
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 6, (5,))
    assert torch.autograd.gradcheck(lambda z: selective_log_softmax(z, index, chunk_size=2), logits)


def test_selective_log_softmax_handles_minus_inf_logits():
    logits = torch.randn(3, 8)
    logits[:, 5:] = -math.inf  # top-k style masking
    logits.requires_grad_()
    index = torch.tensor([0, 4, 6])
    result = selective_log_softmax(logits, index, chunk_size=2)
    torch.testing.assert_close(result[:2], naive_selective_log_softmax(logits, index)[:2])
    assert result[2] == -math.inf
    result[:2].sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 5:] == 0).all()


def test_selective_log_softmax_rejects_mismatched_index():
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(torch.randn(2, 3, 10), torch.zeros(2, 4, dtype=torch.long))


def test_selective_log_softmax_uses_less_peak_memory_than_naive_on_large_vocabulary():
    vocab = 32768
    logits = torch.randn(64, vocab).to(torch.bfloat16)  # 4 MiB; its float32 copy is 8 MiB
    index = torch.randint(0, vocab, (64,))

    naive_peak = peak_allocated_bytes(lambda: naive_selective_log_softmax(logits, index))
    chunked_peak = peak_allocated_bytes(lambda: selective_log_softmax(logits, index, chunk_size=4))

    float32_copy = logits.numel() * 4
    assert naive_peak >= 2 * float32_copy  # the float32 upcast and the full log-softmax
    assert chunked_peak < float32_copy / 4


def test_selective_log_softmax_backward_uses_less_peak_memory_than_naive():
    vocab = 32768
    base = torch.randn(64, vocab).to(torch.bfloat16)
    index = torch.randint(0, vocab, (64,))

    def forward_backward(fn):
        logits = base.clone().requires_grad_()
        fn(logits, index).sum().backward()

    naive_peak = peak_allocated_bytes(lambda: forward_backward(naive_selective_log_softmax))
    chunked_peak = peak_allocated_bytes(
        lambda: forward_backward(lambda z, i: selective_log_softmax(z, i, chunk_size=4))
    )
    bf16_size = base.numel() * 2
    float32_block = 4 * vocab * 4
    # Ours: the leaf and its bf16 gradient, plus two float32 blocks of 4 rows (the upcast and
    # the softmax; a third would mean a block outlives its loop iteration) and small per-row
    # vectors. Naive: float32 activations and their gradients.
    assert chunked_peak < 2 * bf16_size + 2.5 * float32_block
    assert naive_peak > 2 * chunked_peak


def test_selective_log_softmax_default_chunking_bounds_memory(monkeypatch):
    vocab = 4096
    logits = torch.randn(256, vocab).to(torch.bfloat16)
    index = torch.randint(0, vocab, (256,))
    monkeypatch.setattr(_dtype, "CHUNK_ELEMENTS", 16 * vocab)  # 16 rows per block
    peak = peak_allocated_bytes(lambda: selective_log_softmax(logits, index))
    assert peak < logits.numel() * 4 / 4
    torch.testing.assert_close(
        selective_log_softmax(logits, index), naive_selective_log_softmax(logits, index)
    )


def lm_head_logprobs_and_grads(dtype: torch.dtype, overwrite: bool, temperature: float = 1.0):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(48, 16, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(300, 16, generator=generator).to(dtype).requires_grad_()
    index = torch.randint(0, 300, (48,), generator=generator)
    upstream = torch.randn(48, generator=generator)
    logits = hidden @ weight.T
    logits = logits if temperature == 1.0 else logits / temperature
    seen = {}
    logits.register_hook(lambda grad: seen.update(grad_ptr=grad.data_ptr()))
    logits_ptr = logits.data_ptr()
    logps = selective_log_softmax(logits, index, chunk_size=7, overwrite_logits=overwrite)
    (logps * upstream).sum().backward()
    return logps.detach(), hidden.grad, weight.grad, seen["grad_ptr"] == logits_ptr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_overwriting_the_lm_head_logits_gives_the_same_gradients(
    dtype, temperature
):
    logps, hidden_grad, weight_grad, in_place = lm_head_logprobs_and_grads(
        dtype, overwrite=True, temperature=temperature
    )
    ref_logps, ref_hidden_grad, ref_weight_grad, ref_in_place = lm_head_logprobs_and_grads(
        dtype, overwrite=False, temperature=temperature
    )
    assert in_place and not ref_in_place
    assert torch.equal(logps, ref_logps)
    assert torch.equal(hidden_grad, ref_hidden_grad)
    assert torch.equal(weight_grad, ref_weight_grad)


def test_logits_overwritable_only_where_no_backward_reads_the_logits_again():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    logits = hidden @ weight.T
    assert logits_overwritable(logits)
    assert logits_overwritable(logits / 0.7)
    assert logits_overwritable(logits.view(2, 2, 10))
    capped = torch.tanh(logits / 30.0) * 30.0  # Gemma-2-style soft-capping
    assert logits_overwritable(capped)  # the product saves tanh's output, not its own
    assert not logits_overwritable(torch.tanh(logits))  # tanh's backward reads its output
    assert not logits_overwritable(torch.tanh(logits).view(2, 2, 10))  # through the view
    leaf = torch.randn(4, 10, requires_grad=True)
    assert not logits_overwritable(leaf)  # the caller's data
    assert not logits_overwritable(leaf.view(2, 2, 10))  # the caller's data, through a view
    assert not logits_overwritable(logits.T)  # not contiguous

    class SavesOutput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out = x * 2
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    assert not logits_overwritable(SavesOutput.apply(logits))


def test_selective_log_softmax_never_overwrites_a_leaf():
    logits = torch.randn(6, 20, requires_grad=True)
    before = logits.detach().clone()
    index = torch.randint(0, 20, (6,))
    selective_log_softmax(logits, index, overwrite_logits=True).sum().backward()
    assert torch.equal(logits.detach(), before)
    assert logits.grad.data_ptr() != logits.data_ptr()


def test_overwriting_the_logits_saves_a_logits_sized_buffer_at_the_peak():
    vocab = 32768
    hidden = torch.randn(64, 32)
    weight = torch.randn(vocab, 32)

    def forward_backward(overwrite: bool):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = h @ w.T
        selective_log_softmax(
            logits, torch.zeros(64, dtype=torch.long), chunk_size=4, overwrite_logits=overwrite
        ).sum().backward()

    logits_bytes = 64 * vocab * 4
    saved = peak_allocated_bytes(lambda: forward_backward(False)) - peak_allocated_bytes(
        lambda: forward_backward(True)
    )
    assert saved >= 0.9 * logits_bytes


# --- sequence_logprobs -------------------------------------------------------------------


def peaked_logits(peaks: list[list[int]], vocab: int) -> torch.Tensor:
    """Logits whose softmax puts 1/2 on ``peaks[b][t]`` and 1/(2 (V-1)) on every other token."""
    logits = torch.zeros(len(peaks), len(peaks[0]), vocab)
    index = torch.tensor(peaks)
    logits.scatter_(-1, index[..., None], math.log(vocab - 1))
    return logits


def test_sequence_logprobs_shifts_by_one_on_a_worked_example():
    vocab = 10
    input_ids = torch.tensor([[5, 9, 2, 7]])
    response_mask = torch.tensor([[0, 0, 1, 1]])
    # Row 1 predicts token 2 with p = 1/2; row 2 puts 1/2 on token 3, so token 7 gets 1/18.
    logits = peaked_logits([[9, 2, 3, 0]], vocab)
    result = sequence_logprobs(logits, input_ids, response_mask)
    expected = torch.tensor([[0.0, 0.0, math.log(0.5), math.log(1 / 18)]])
    torch.testing.assert_close(result, expected)


def test_sequence_logprobs_position_zero_is_zero_even_when_masked_in():
    logits = peaked_logits([[3, 1, 4], [1, 5, 9]], vocab=10)
    input_ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    result = sequence_logprobs(logits, input_ids, torch.ones(2, 3))
    assert (result[:, 0] == 0).all()
    # Row t peaks on token t, not t + 1: none of the scored tokens is the peak.
    torch.testing.assert_close(result[:, 1:], torch.full((2, 2), math.log(1 / 18)))


def loop_sequence_logprobs(logits, input_ids, mask):
    out = torch.zeros(input_ids.shape)
    for b in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            if mask[b, t]:
                out[b, t] = torch.log_softmax(logits[b, t - 1].float(), -1)[input_ids[b, t]]
    return out


def test_sequence_logprobs_matches_a_loop_with_ragged_masks_and_padding_ids():
    batch, time, vocab = 4, 9, 30
    logits = torch.randn(batch, time, vocab) * 3
    input_ids = torch.randint(0, vocab, (batch, time))
    starts, ends = torch.tensor([0, 2, 3, 5]), torch.tensor([9, 6, 4, 5])  # last one is empty
    positions = torch.arange(time)
    mask = (positions >= starts[:, None]) & (positions < ends[:, None])
    input_ids[~mask] = -100  # padding ids outside the vocabulary must never be read
    result = sequence_logprobs(logits, input_ids, mask.long(), chunk_size=3)
    expected = loop_sequence_logprobs(logits, input_ids, mask)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    assert (result[~mask] == 0).all()


def test_sequence_logprobs_gradient_flows_only_to_the_predicting_rows():
    logits = torch.randn(2, 5, 12, requires_grad=True)
    input_ids = torch.randint(0, 12, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    sequence_logprobs(logits, input_ids, mask).sum().backward()

    reference = logits.detach().clone().requires_grad_()
    loop_sequence_logprobs(reference, input_ids, mask).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad)
    predicting_rows = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    assert (logits.grad[~predicting_rows] == 0).all()
    assert (logits.grad[predicting_rows].abs().sum(-1) > 0).all()


def test_sequence_logprobs_passes_gradcheck_in_float64():
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(
        lambda z: sequence_logprobs(z, input_ids, mask, chunk_size=2), logits
    )


def test_sequence_logprobs_returns_float32_for_bfloat16_logits():
    logits = torch.randn(2, 4, 16).to(torch.bfloat16)
    input_ids = torch.randint(0, 16, (2, 4))
    result = sequence_logprobs(logits, input_ids, torch.ones(2, 4, dtype=torch.bool))
    assert result.dtype == torch.float32
    expected = loop_sequence_logprobs(logits.float(), input_ids, torch.ones(2, 4))
    torch.testing.assert_close(result, expected)


def test_sequence_logprobs_rejects_unaligned_logits():
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logprobs(
            torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)
        )


def test_predicts_scored_mask_moves_the_mask_one_position_left():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    expected = torch.tensor([[False, True, True, False], [True, False, False, False], [False] * 4])
    assert torch.equal(predicts_scored_mask(mask), expected)


def test_sequence_logprobs_at_selected_rows_equals_the_full_logits_version():
    batch, time, vocab = 4, 9, 30
    logits = torch.randn(batch, time, vocab, requires_grad=True)
    input_ids = torch.randint(0, vocab, (batch, time))
    positions = torch.arange(time)
    mask = (positions >= torch.tensor([1, 2, 3, 5])[:, None]) & (
        positions < torch.tensor([9, 6, 4, 5])[:, None]
    )
    input_ids[~mask] = -100
    selected = logits[predicts_scored_mask(mask)]  # what logits_to_keep=<bool mask> returns
    result = sequence_logprobs_at(selected, input_ids, mask, chunk_size=2)
    expected = loop_sequence_logprobs(logits, input_ids, mask)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)

    result.sum().backward()
    reference = logits.detach().clone().requires_grad_()
    loop_sequence_logprobs(reference, input_ids, mask).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def test_sequence_logprobs_at_rejects_a_row_count_that_does_not_match_the_mask():
    mask = torch.tensor([[0, 1, 1]])  # two scored tokens -> two logit rows
    with pytest.raises(ValueError, match=r"expected \[2, V\] logits"):
        sequence_logprobs_at(torch.randn(3, 8), torch.zeros(1, 3, dtype=torch.long), mask)


# --- entropy_from_logits -----------------------------------------------------------------


@pytest.mark.parametrize("vocab", [2, 7, 50257])
def test_entropy_of_uniform_logits_is_log_vocab(vocab):
    logits = torch.full((3, vocab), 2.5)
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((3,), math.log(vocab)))


def test_entropy_of_one_hot_logits_is_zero():
    nearly_one_hot = torch.zeros(4, 100)
    nearly_one_hot[:, 7] = 100.0
    assert entropy_from_logits(nearly_one_hot).abs().max() < 1e-6
    exactly_one_hot = torch.full((4, 100), -math.inf)
    exactly_one_hot[:, 3] = 0.0
    assert (entropy_from_logits(exactly_one_hot) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_naive_softmax_entropy(dtype):
    logits = (torch.randn(3, 5, 200) * 4).to(dtype)
    result = entropy_from_logits(logits, chunk_size=4)
    assert result.shape == (3, 5) and result.dtype == torch.float32
    torch.testing.assert_close(result, naive_entropy(logits.float()), rtol=1e-5, atol=1e-5)


def test_entropy_gradient_equals_naive_gradient_and_passes_gradcheck():
    base = torch.randn(6, 30) * 3
    upstream = torch.randn(6)
    logits = base.clone().requires_grad_()
    (entropy_from_logits(logits, chunk_size=4) * upstream).sum().backward()
    reference = base.clone().requires_grad_()
    (naive_entropy(reference) * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-5, atol=1e-6)

    small = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, chunk_size=3), small)


def test_entropy_with_minus_inf_logits_has_finite_value_and_gradient():
    logits = torch.randn(3, 10)
    logits[:, 4:] = -math.inf
    logits.requires_grad_()
    result = entropy_from_logits(logits)
    torch.testing.assert_close(result, naive_entropy(logits.detach()[:, :4]))
    result.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 4:] == 0).all()
