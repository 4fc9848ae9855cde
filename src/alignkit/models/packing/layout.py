"""Packed layouts: where each real token of a padded batch goes in the packed rows.

Pure tensor and list code, no model: :func:`pack_rows` (a padded ``[R, T]`` batch, optionally
with shared prefixes) and :func:`segments_layout` (rows that already hold several sequences)
return a :class:`PackedLayout`, which says which token goes where, which key each query may see
(a ``[P, 1, L, L]`` tree mask, or the :class:`~alignkit.models.block_attention.AttentionBlock`
of each row) and how to map packed outputs back. How a model runs a layout is
`models.packing.model`; the package docstring explains the whole.

Costs are counted in tokens through the model: ``attention_cost`` is one (query, key) pair of
attention relative to one token, ``call_cost`` one attention call (both from the model's shapes,
:func:`~alignkit.models.packing.model.packing_options`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.models.block_attention import AttentionBlock

__all__ = ["PackedLayout", "pack_rows", "segments_layout"]

# Compare at most this many [row, row, token] entries at once when finding shared prefixes.
_LCP_BLOCK_ELEMENTS = 1 << 24
# Link-cutting levels tried when spreading trees of shared prefixes over packed rows.
_MAX_CUTS = 8


@dataclass(frozen=True)
class PackedLayout:
    """Where each token of a padded ``[R, T]`` batch lives in the packed ``[P, L]`` rows.

    Attributes:
        input_ids: ``[P, L]`` packed tokens (pads after the last sequence of a row are 0).
        position_ids: ``[P, L]`` each token's position in its own sequence.
        visible: ``[P, 1, L, L]`` bool, True where query ``q`` may attend to key ``k``; None
            when ``blocks`` stand for it.
        where: ``[R, T]`` flat index (``p * L + l``) of the packed token whose key and hidden
            state stand for token ``(r, t)``; -1 at pads.
        scored_at: ``[R, T]`` flat index of the packed token whose log-prob (from the packed
            position before it) is token ``(r, t)``'s; differs from ``where`` at the kept last
            common token of a shared prefix; -1 at pads.
        segment_start: ``[P, L]`` bool, True at each packed sequence's first token (its
            log-prob is not predicted by the position before it).
        padded_tokens: ``R * T``, the positions of the padded batch.
        packed_tokens: real tokens in the packed rows (shared prefixes counted once).
        blocks: with ``pack_rows(blocks=True)``: the one packed row's attention, row by row
            (`models.block_attention`); else None.
    """

    input_ids: Tensor
    position_ids: Tensor
    visible: Tensor | None
    where: Tensor
    scored_at: Tensor
    segment_start: Tensor
    padded_tokens: int
    packed_tokens: int
    blocks: tuple[AttentionBlock, ...] | None = None

    def unpack(self, packed: Tensor, index: Tensor | None = None) -> Tensor:
        """``[P, L, ...]`` per-token values to ``[R, T, ...]`` (0 at pads); differentiable.

        ``index`` is :attr:`where` (hidden states, default) or :attr:`scored_at` (log-probs).
        """
        index = self.where if index is None else index
        flat = packed.reshape(-1, *packed.shape[2:])
        out = flat.index_select(0, index.clamp(min=0).reshape(-1))
        out = out.view(*index.shape, *packed.shape[2:])
        pad = (index < 0).view(*index.shape, *([1] * (packed.ndim - 2)))
        return out.masked_fill(pad, 0)

    def pack_scored(self, scored: Tensor) -> Tensor:
        """``[R, T]`` scored mask to the ``[P, L]`` packed tokens whose log-probs are needed.

        The first token of a sequence is never scored (nothing predicts it), as in
        ``ops.predicts_scored_mask``.
        """
        take = (scored != 0) & (self.scored_at >= 0)
        out = torch.zeros(self.input_ids.numel(), dtype=torch.bool, device=scored.device)
        out[self.scored_at[take]] = True
        return out.view(self.input_ids.shape) & ~self.segment_start


def pack_rows(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    share_prefixes: bool = True,
    attention_cost: float = 0.0,
    blocks: bool = False,
    call_cost: float = 0.0,
) -> PackedLayout | None:
    """Pack the real tokens of a padded batch; None when a row's tokens are not contiguous
    or packing would not save work (the cost below is not lower than the padded batch's).

    Args:
        input_ids: ``[R, T]``.
        attention_mask: ``[R, T]``, 1 on real tokens; each row's real tokens must be one
            contiguous run (left, right or no padding), else there is nothing to pack safely.
        share_prefixes: compute a prefix common with an earlier row once (a tree mask).
        attention_cost: the cost of one (query, key) pair of attention relative to one token
            through the rest of the model
            (:func:`~alignkit.models.packing.model.attention_cost`). Attention with a mask
            computes every pair of a packed row, so one long row trades padding for quadratic
            attention; the trees of rows sharing a prefix are spread over the number of rows
            ``P`` minimising ``P * L * (1 + attention_cost * L)`` (``L``: the longest row).
            0: one packed row.
        blocks: allow one packed row with, instead of its ``[L, L]`` mask, the
            :attr:`PackedLayout.blocks` of attention: each row's own tokens against the keys of
            its sequence (every shared prefix kept: sharing adds no attention), costing
            ``sum(own * (1 + attention_cost * length)) + call_cost * rows``; taken when cheaper
            than the best masked layout (``+ call_cost``: one attention call).
        call_cost: the fixed cost of one attention call, in tokens
            (:func:`~alignkit.models.packing.model.packing_options`): on a small model, many
            short calls cost more than one masked call.
    """
    rows = _left_aligned(input_ids, attention_mask)
    if rows is None:
        return None
    source, shared = _shared_prefixes(rows.ids, rows.valid, enabled=share_prefixes)
    plan = _plan(rows.lengths, source, shared, attention_cost, blocks, call_cost)
    if plan.cost >= _masked_cost(*input_ids.shape, attention_cost) + call_cost:
        return None  # nothing to gain: no padding, no shared prefix, or attention eats it
    return _build(rows, plan, source)


# ----------------------------------------------------------------------------- pack_rows' steps


@dataclass(frozen=True)
class _Rows:
    """A padded batch's real tokens, left-aligned: column ``p`` of a row is its ``p``-th."""

    ids: Tensor  # [R, T] the aligned tokens (the columns past a row's length repeat its last)
    valid: Tensor  # [R, T] bool: p < length
    columns: Tensor  # [R, T] the padded column each aligned position came from
    lengths: Tensor  # [R]
    arange: Tensor  # [T]


def _left_aligned(input_ids: Tensor, attention_mask: Tensor) -> _Rows | None:
    """The batch's rows left-aligned; None if a row's real tokens are not one contiguous run."""
    real = attention_mask.bool()
    width = real.shape[1]
    arange = torch.arange(width, device=real.device)
    lengths = real.sum(dim=1)
    first = torch.where(real, arange, width).amin(dim=1)
    last = torch.where(real, arange, -1).amax(dim=1)
    if bool(((lengths > 0) & (last - first + 1 != lengths)).any()):
        return None
    columns = (first.clamp(max=width - 1)[:, None] + arange).clamp(max=width - 1)
    valid = arange < lengths[:, None]
    return _Rows(input_ids.gather(1, columns), valid, columns, lengths, arange)


@dataclass(frozen=True)
class _Plan:
    """The layout search's outcome, on Python lists indexed by row (a batch has tens of rows,
    and a torch op per row-level step would cost more than the arithmetic)."""

    cost: float  # in tokens through the model, one attention call included
    blocks: bool  # one packed row with attention blocks, no mask
    lengths: list[int]
    source: list[int]  # the earlier row whose prefix a row shares (itself if none)
    shared: list[int]  # tokens a row leaves to its source (the links kept)
    own: list[int]  # tokens a row runs itself: lengths - shared
    base: list[int]  # flat packed index of each row's first own token
    bin_tokens: list[int]  # tokens in each packed row
    width: int  # L, the packed rows' width


def _plan(
    lengths: Tensor,
    source: Tensor,
    shared: Tensor,
    attention_cost: float,
    blocks: bool,
    call_cost: float,
) -> _Plan:
    """Which shared prefixes to keep, whether to use attention blocks, and where each row's
    own tokens go: the cheapest masked layout over the link cuts (:func:`_link_cuts`) against
    one row of blocks (every prefix kept)."""
    length_list, source_list, shared_list = (x.tolist() for x in (lengths, source, shared))
    cuts = _link_cuts(shared_list) if attention_cost > 0 else [shared_list]
    cost, bins, kept = min(
        ((*_layout_cost(length_list, source_list, cut, attention_cost), cut) for cut in cuts),
        key=lambda option: option[0],
    )
    cost += call_cost
    if blocks:
        block_cost = _block_cost(lengths - shared, lengths, attention_cost, call_cost)
        blocks = block_cost <= cost
        if blocks:
            cost, bins, kept = block_cost, [0] * len(length_list), shared_list
    own = [n - k for n, k in zip(length_list, kept, strict=True)]
    root = _roots(source_list, kept)
    base, bin_tokens, width = _place([bins[r] for r in root], root, own)
    return _Plan(cost, blocks, length_list, source_list, kept, own, base, bin_tokens, width)


def _place(bin_of_row: list[int], root: list[int], own: list[int]) -> tuple[list, list, int]:
    """Each row's flat start in the packed rows, each packed row's tokens, and their width.

    Packed order: by packed row, trees together (by root), rows in index order in a tree.
    """
    rows = len(own)
    order = sorted(range(rows), key=lambda r: (bin_of_row[r], root[r], r))
    packed_rows = max(bin_of_row) + 1 if rows else 1
    bin_tokens, offset_in_bin = [0] * packed_rows, [0] * rows
    for r in order:
        offset_in_bin[r] = bin_tokens[bin_of_row[r]]
        bin_tokens[bin_of_row[r]] += own[r]
    width = max(max(bin_tokens), 1)
    base = [b * width + o for b, o in zip(bin_of_row, offset_in_bin, strict=True)]
    return base, bin_tokens, width


def _build(rows: _Rows, plan: _Plan, source: Tensor) -> PackedLayout:
    """The tensors of the layout that ``plan`` describes."""
    device, arange, valid = rows.valid.device, rows.arange, rows.valid
    count, width = valid.shape
    index = torch.arange(count, device=device)
    shared = torch.tensor(plan.shared, dtype=torch.long, device=device)
    source = torch.where(shared > 0, source, index)
    base = torch.tensor(plan.base, dtype=torch.long, device=device)

    own_index = base[:, None] + arange - shared[:, None]
    own_tokens = valid & (arange >= shared[:, None])
    where = _resolve(own_index, own_tokens, valid & ~own_tokens, source)
    # The kept last common token's log-prob is the earlier row's (predicted inside its tree).
    scored_own = valid & ((arange > shared[:, None]) | (shared[:, None] == 0))
    scored_at = _resolve(own_index, scored_own, valid & ~scored_own, source)

    flat = len(plan.bin_tokens) * plan.width
    own_position = torch.zeros(flat, device=device, dtype=torch.long)
    own_flat = own_index[own_tokens]
    own_position[own_flat] = arange.expand(count, width)[own_tokens]
    packed_ids = torch.zeros(flat, device=device, dtype=rows.ids.dtype)
    packed_ids[own_flat] = rows.ids[own_tokens]
    segment_start = torch.zeros(flat, device=device, dtype=torch.bool)
    segment_start[base[rows.lengths > 0]] = True

    if plan.blocks:
        visible, attention_blocks = None, _blocks(where, plan)
    else:
        visible, attention_blocks = _tree_mask(plan, device), None

    # Back from the left-aligned columns to the padded ones.
    row_of = index[:, None].expand(count, width)
    padded_rows, padded_columns = row_of[valid], rows.columns[valid]

    def to_columns(values: Tensor) -> Tensor:
        out = torch.full_like(values, -1)
        out[padded_rows, padded_columns] = values[valid]
        return out

    shape = (len(plan.bin_tokens), plan.width)
    return PackedLayout(
        input_ids=packed_ids.view(shape),
        position_ids=own_position.view(shape),
        visible=visible,
        where=to_columns(where),
        scored_at=to_columns(scored_at),
        segment_start=segment_start.view(shape),
        padded_tokens=count * width,
        packed_tokens=sum(plan.own),
        blocks=attention_blocks,
    )


def segments_layout(
    input_ids: Tensor,
    position_ids: Tensor,
    real: Tensor,
    attention_cost: float = 0.0,
    call_cost: float = 0.0,
) -> PackedLayout | None:
    """The layout, with attention :attr:`~PackedLayout.blocks`, of rows that already hold
    several sequences each (SFT's packed rows): every row's real tokens (``real``, ``[B, T]``
    bool, left-aligned runs) end to end in one row, each sequence (a run of ``position_ids``
    ``0, 1, 2, ...``) a causal block of its own. None where the positions do not restart at 0
    and count up by one within a row's real tokens, or where the rows as they are (one masked
    attention call over ``[B, T]``) cost no more, by the cost rule of :func:`pack_rows`."""
    rows, width = input_ids.shape
    lengths = real.sum(dim=1)
    arange = torch.arange(width, device=input_ids.device)
    if not bool((real == (arange < lengths[:, None])).all()):
        return None  # not right-padded: the flat order would not keep sequences whole
    positions = position_ids[real]
    if positions.numel() == 0:
        return None
    start = positions == 0
    steps = positions[1:] == positions[:-1] + 1
    row_starts = torch.cumsum(lengths, 0) - lengths
    start_of_row = torch.zeros_like(start)
    start_of_row[row_starts[lengths > 0]] = True
    if not bool(start[start_of_row].all()) or not bool((start[1:] | steps).all()):
        return None
    flat = torch.cumsum(real.reshape(-1).long(), 0) - 1
    where = torch.where(real, flat.view(rows, width), -1)
    starts = start.nonzero()[:, 0].tolist()
    ends = [*starts[1:], positions.numel()]
    sizes = torch.tensor([b - a for a, b in zip(starts, ends, strict=True)])
    block_cost = _block_cost(sizes, sizes, attention_cost, call_cost)
    if block_cost > _masked_cost(rows, width, attention_cost) + call_cost:
        return None
    return PackedLayout(
        input_ids=input_ids[real][None],
        position_ids=positions[None],
        visible=None,
        where=where,
        scored_at=where,
        segment_start=start[None],
        padded_tokens=rows * width,
        packed_tokens=positions.numel(),
        blocks=tuple(AttentionBlock(a, b) for a, b in zip(starts, ends, strict=True)),
    )


# ----------------------------------------------------------------------------- the pieces


def _shared_prefixes(aligned: Tensor, valid: Tensor, *, enabled: bool) -> tuple[Tensor, Tensor]:
    """Per row: the earlier row it shares a prefix with, and how many tokens it leaves to it.

    The source is the earliest row ``j < i`` with the longest common prefix ``lcp`` of real
    tokens; the row leaves ``lcp - 1`` tokens to it (keeping the last common token), if that
    is at least 1. Rows that share nothing get themselves as source and 0.
    """
    rows, width = aligned.shape
    index = torch.arange(rows, device=aligned.device)
    if not enabled or rows < 2:
        return index, torch.zeros(rows, dtype=torch.long, device=aligned.device)
    block = max(1, _LCP_BLOCK_ELEMENTS // max(rows * width, 1))
    best = torch.zeros(rows, dtype=torch.long, device=aligned.device)
    source = index.clone()
    for lo in range(0, rows, block):
        hi = min(rows, lo + block)
        same = (aligned[lo:hi, None] == aligned[None]) & valid[lo:hi, None] & valid[None]
        lcp = same.long().cumprod(dim=-1).sum(dim=-1)  # [hi - lo, rows]
        lcp = lcp.masked_fill(index[None] >= index[lo:hi, None], -1)  # earlier rows only
        best[lo:hi], source[lo:hi] = lcp.max(dim=1)  # max returns the first maximal index
    shared = (best - 1).clamp(min=0)
    source = torch.where(shared > 0, source, index)
    return source, shared


def _link_cuts(shared: list[int]) -> list[list[int]]:
    """Sharing with every link kept, then without the links sharing the fewest tokens, then
    fewer still: a short common prefix (a chat template's system prompt) would otherwise tie
    the whole batch into one tree that cannot be spread over several packed rows."""
    levels = sorted({s for s in shared if s > 0})
    if len(levels) > _MAX_CUTS:  # a few quantiles are enough to find the weak links
        levels = [levels[i * (len(levels) - 1) // (_MAX_CUTS - 1)] for i in range(_MAX_CUTS)]
    return [shared] + [[0 if s <= level else s for s in shared] for level in levels]


def _layout_cost(
    lengths: list[int], source: list[int], shared: list[int], attention_cost: float
) -> tuple[float, list[int]]:
    """The cost and packed rows (:func:`_assign_bins`) of packing with these shared prefixes."""
    root = _roots(source, shared)
    tokens = [0] * len(lengths)
    for row, tree in enumerate(root):
        tokens[tree] += lengths[row] - shared[row]
    return _assign_bins(tokens, root, attention_cost)


def _assign_bins(
    tree_tokens: list[int], root: list[int], attention_cost: float
) -> tuple[float, list[int]]:
    """Packed row of each tree (indexed by root row; other entries unused): for each row
    count ``P``, trees longest first each into the emptiest row (LPT), keeping the cheapest
    ``P`` by ``P * L * (1 + attention_cost * L)``; and that cost."""
    roots = sorted(set(root))
    longest_first = sorted(roots, key=lambda r: (-tree_tokens[r], r))
    best: tuple[float, dict[int, int]] = (float("inf"), dict.fromkeys(roots, 0))
    for packed_rows in range(1, len(roots) + 1 if attention_cost > 0 else 2):
        heap = [(0, b) for b in range(packed_rows)]  # (load, row): the emptiest row on top
        loads, assignment = [0] * packed_rows, {}
        for r in longest_first:
            load, target = heapq.heappop(heap)
            loads[target] = load + tree_tokens[r]
            heapq.heappush(heap, (loads[target], target))
            assignment[r] = target
        width = max(loads)
        cost = _masked_cost(packed_rows, width, attention_cost)
        if 0 in loads:
            break  # more rows than it takes: only empty rows would follow
        if cost < best[0]:
            best = (cost, assignment)
        else:
            break  # past the minimum: more rows only add padding
    out = [0] * len(tree_tokens)
    for r, b in best[1].items():
        out[r] = b
    return best[0], out


def _masked_cost(rows: int, width: int, attention_cost: float) -> float:
    """Cost, in tokens through the model, of ``rows`` masked rows of ``width``: every position
    runs the model, every (query, key) pair of a row the attention."""
    return rows * width * (1.0 + attention_cost * width)


def _block_cost(own: Tensor, lengths: Tensor, attention_cost: float, call_cost: float) -> float:
    """Cost of block attention: each sequence's ``own`` tokens run the model and attend to its
    ``lengths`` keys, one attention call of ``call_cost`` tokens per sequence with tokens."""
    own = own.double()
    calls = int((own > 0).sum())
    return float((own * (1.0 + attention_cost * lengths)).sum()) + call_cost * calls


def _roots(source: list[int], shared: list[int]) -> list[int]:
    """The row at the root of each row's chain of sources (a source is an earlier row)."""
    root = list(range(len(source)))
    for row, (parent, count) in enumerate(zip(source, shared, strict=True)):
        if count > 0:
            root[row] = root[parent]
    return root


def _resolve(own_index: Tensor, own: Tensor, inherited: Tensor, source: Tensor) -> Tensor:
    """``own_index`` where ``own``; where ``inherited``, the source row's resolved entry at the
    same position; -1 elsewhere. Sources come earlier, so depth-many passes settle it."""
    out = torch.where(own, own_index, -1)
    while True:
        nxt = torch.where(inherited, out[source], out)
        if torch.equal(nxt, out):
            return out
        out = nxt


def _blocks(where: Tensor, plan: _Plan) -> tuple[AttentionBlock, ...]:
    """Each row's own tokens in the one packed row, in packed order: causal on their own when
    the row shares nothing, else against its whole sequence's keys (``where[r, :length]``: the
    shared prefix's copies, then its own) with the causal rule offset by the prefix."""
    out = []
    for row in sorted(range(len(plan.base)), key=plan.base.__getitem__):
        start, count = plan.base[row], plan.own[row]
        length, prefix = plan.lengths[row], plan.shared[row]
        if count == 0:
            continue
        if prefix == 0:
            out.append(AttentionBlock(start, start + count))
            continue
        positions = torch.arange(length, device=where.device)
        visible = positions[None, :] <= positions[prefix:, None]
        out.append(AttentionBlock(start, start + count, where[row, :length], visible))
    return tuple(out)


def _tree_mask(plan: _Plan, device: torch.device) -> Tensor:
    """``[P, 1, L, L]``: query ``q`` (row ``r``'s token at position ``p``) sees key ``k`` (at
    position ``p'``) iff ``p' <= p`` and ``k`` stands for row ``r``'s token ``p'``: its own
    sequence causally, including the prefix it shares. A pad query sees itself (no NaN softmax).

    Built from rectangles: row ``r``'s own tokens (flat start ``base[r]``, ``own[r]`` of them,
    positions ``shared[r]..``) see themselves causally and, whole, each ancestor's own tokens
    that stand for positions below ``shared[r]`` (all earlier than their own positions): the
    source's positions ``shared[a] .. bound``, the bound shrinking down the chain."""
    base, shared, source, width = plan.base, plan.shared, plan.source, plan.width
    visible = torch.zeros(len(plan.bin_tokens), width, width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    for r, count in enumerate(plan.own):
        if count == 0:
            continue
        row, start = divmod(base[r], width)
        visible[row, start : start + count, start : start + count] = causal[:count, :count]
        bound, ancestor = shared[r], r
        while shared[ancestor] > 0:
            ancestor = source[ancestor]
            served = bound - shared[ancestor]  # positions shared[ancestor] .. bound - 1
            if served > 0:
                first = base[ancestor] - row * width
                visible[row, start : start + count, first : first + served] = True
            bound = min(bound, shared[ancestor])
    for row, used in enumerate(plan.bin_tokens):
        visible[row].diagonal()[used:] = True
    return visible[:, None]
