"""The precision and memory contract of ``alignkit.ops``, written once.

Precision: every formula computes in *at least float32*. Half-precision floats (bfloat16,
float16), integers and bools are computed in float32; float64 stays float64, so ``gradcheck``
and float64 references see no rounding. With several inputs the widest wins: any float64
input makes the computation float64.

Memory: functions over ``[N, V]`` logits work on blocks of rows so that each float32
temporary holds about ``CHUNK_ELEMENTS`` values, whatever the vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "at_least_float32",
    "compute_dtype",
    "map_row_blocks",
    "rows_per_chunk",
]

# Elements (rows x vocab) per block when no chunk size is given: 2**22 float32 values are
# 16 MiB per temporary, under glibc's 32 MiB mmap threshold, so a block's temporaries are reused
# from the heap instead of being mapped and page-faulted anew (2**24 measured 1.2-1.6x slower in
# bench/logprobs.py); still ~27 rows per block for a 152k vocabulary, so per-block overhead is
# negligible.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(*inputs: Tensor | torch.dtype | None) -> torch.dtype:
    """The dtype to compute in for these tensors (or dtypes; ``None`` entries are skipped).

    ``promote_types`` of float32 and every input: float32 for half precision, integers and
    bools; float64 as soon as one input is float64.
    """
    dtype = torch.float32
    for item in inputs:
        if item is not None:
            dtype = torch.promote_types(
                dtype, item if isinstance(item, torch.dtype) else item.dtype
            )
    return dtype


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in ``compute_dtype(x)`` (no copy when it already is)."""
    return x.to(compute_dtype(x))


def rows_per_chunk(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per block for ``[N, vocab_size]`` inputs: ``chunk_size`` if given (>= 1), else
    ``CHUNK_ELEMENTS // vocab_size`` (at least 1)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
        return chunk_size
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


def map_row_blocks(
    block_fn: Callable[[int, int], Sequence[Tensor]],
    outputs: Sequence[Tensor],
    n_rows: int,
    chunk_rows: int,
) -> None:
    """Fill ``outputs[k][start:end]`` with ``block_fn(start, end)[k]`` for consecutive blocks.

    Each block's result goes straight into ``_write_block`` and is freed when it returns, before
    the next block is computed (holding it in a loop variable would keep two blocks alive).
    """
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        _write_block(outputs, start, end, block_fn(start, end))


def _write_block(
    outputs: Sequence[Tensor], start: int, end: int, results: Sequence[Tensor]
) -> None:
    for output, values in zip(outputs, results, strict=True):
        output[start:end] = values
