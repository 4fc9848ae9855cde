"""Padding-free packed forwards: a padded batch's real tokens in one (or a few) rows.

A padded ``[R, T]`` batch spends compute on pad positions (a quarter of a DPO step on real
data). :func:`pack_rows` lays the batch's real tokens end to end in ``[P, L]`` rows, with

- **positions restarting per sequence** (each token keeps the position it had in its own row),
- **a block-diagonal causal mask** ``[P, 1, L, L]``: a token sees the earlier tokens of its own
  sequence and nothing else,
- **shared prefixes computed once**: when a row starts with the same tokens as an earlier row
  (the prompt of a DPO pair's chosen and rejected rows, a GRPO group's prompt), its first
  ``s = lcp - 1`` tokens are not repeated; its own tokens attend to the earlier row's copies of
  them (a tree mask). The last common token is kept in the later row as well, so that every
  token of a row is still predicted by the position just before it in the packed row.

The model then sees exactly the attention pattern of the padded batch, so logits, log-probs,
hidden states and gradients are those of the padded forward (tested to float32 round-off). The
mask is passed to the model as a 4D mask (boolean for ``sdpa``, additive for ``eager``), which
transformers uses as given; ``use_cache=False`` keeps the model from allocating a cache.

:meth:`PackedLayout.unpack` maps any per-token output (``[P, L]`` log-probs, ``[P, L, H]``
hidden states) back to the padded ``[R, T]`` layout, 0 at pads.

With ``blocks=True`` (for sdpa models, :func:`packing_options`) everything goes into one row
without padding and no ``[L, L]`` mask is built: each row's own tokens are an
:class:`~alignkit.models.block_attention.AttentionBlock` whose attention runs on its own, over
the keys of its sequence (`models.block_attention`), so attention costs about
``sum(own_tokens * sequence_length)`` instead of ``L**2``.
"""

from __future__ import annotations

import functools
import heapq
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignkit.models.block_attention import (
    AttentionBlock,
    block_attention,
    block_attention_available,
)

__all__ = [
    "PackedLayout",
    "attention_cost",
    "pack_rows",
    "packable_model",
    "packed_attention",
    "packed_model_inputs",
    "packing_options",
    "segments_layout",
]

# Compare at most this many [row, row, token] entries at once when finding shared prefixes.
_LCP_BLOCK_ELEMENTS = 1 << 24
# Link-cutting levels tried when spreading trees of shared prefixes over packed rows.
_MAX_CUTS = 8
# The fixed cost of one attention call (forward and backward) in FLOPs: ~60 us at 100 GFLOP/s.
_CALL_FLOPS = 6e6


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
            through the rest of the model (:func:`attention_cost`). Attention with a mask
            computes every pair of a packed row, so one long row trades padding for quadratic
            attention; the trees of rows sharing a prefix are spread over the number of rows
            ``P`` minimising ``P * L * (1 + attention_cost * L)`` (``L``: the longest row).
            0: one packed row.
        blocks: allow one packed row with, instead of its ``[L, L]`` mask, the
            :attr:`PackedLayout.blocks` of attention: each row's own tokens against the keys of
            its sequence (every shared prefix kept: sharing adds no attention), costing
            ``sum(own * (1 + attention_cost * length)) + call_cost * rows``; taken when cheaper
            than the best masked layout (``+ call_cost``: one attention call).
        call_cost: the fixed cost of one attention call, in tokens (:func:`packing_options`):
            on a small model, many short calls cost more than one masked call.
    """
    real = attention_mask.bool()
    rows, width = real.shape
    device = real.device
    arange = torch.arange(width, device=device)
    lengths = real.sum(dim=1)
    first = torch.where(real, arange, width).amin(dim=1)
    last = torch.where(real, arange, -1).amax(dim=1)
    if bool(((lengths > 0) & (last - first + 1 != lengths)).any()):
        return None
    # Left-aligned view: column p of a row is its p-th real token.
    columns = (first.clamp(max=width - 1)[:, None] + arange).clamp(max=width - 1)
    aligned = input_ids.gather(1, columns)
    valid = arange < lengths[:, None]

    source, all_shared = _shared_prefixes(aligned, valid, enabled=share_prefixes)
    index = torch.arange(rows, device=device)
    # The layout search runs on Python lists: a batch has tens of rows, and a torch op per
    # row-level step would cost more than the arithmetic.
    length_list, source_list, shared_list = (x.tolist() for x in (lengths, source, all_shared))
    packed_cost, bin_list, kept = min(
        (
            (*_layout_cost(length_list, source_list, option, attention_cost), option)
            for option in (_link_cuts(shared_list) if attention_cost > 0 else [shared_list])
        ),
        key=lambda option: option[0],
    )
    packed_cost += call_cost
    if blocks:
        block_cost = _block_cost(lengths - all_shared, lengths, attention_cost, call_cost)
        blocks = block_cost <= packed_cost
        if blocks:
            packed_cost, bin_list, kept = block_cost, [0] * rows, shared_list
    shared = torch.tensor(kept, dtype=torch.long, device=device)
    source = torch.where(shared > 0, source, index)
    root = _roots(source_list, kept)
    own_list = [n - k for n, k in zip(length_list, kept, strict=True)]
    # Packed order: by packed row, trees together (by root), rows in index order in a tree.
    bin_of_row = [bin_list[r] for r in root]
    order = sorted(range(rows), key=lambda r: (bin_of_row[r], root[r], r))
    packed_rows = max(bin_of_row) + 1 if rows else 1
    bin_tokens, offset_in_bin = [0] * packed_rows, [0] * rows
    for r in order:
        offset_in_bin[r] = bin_tokens[bin_of_row[r]]
        bin_tokens[bin_of_row[r]] += own_list[r]
    packed_width = max(max(bin_tokens), 1)
    if packed_cost >= _masked_cost(rows, width, attention_cost) + call_cost:
        return None  # nothing to gain: no padding, no shared prefix, or attention eats it
    # Flat packed index of each row's first own token (row order).
    base_list = [b * packed_width + o for b, o in zip(bin_of_row, offset_in_bin, strict=True)]
    base = torch.tensor(base_list, dtype=torch.long, device=device)

    own_index = base[:, None] + arange - shared[:, None]
    own_tokens = valid & (arange >= shared[:, None])
    where = _resolve(own_index, own_tokens, valid & ~own_tokens, source)
    # The kept last common token's log-prob is the earlier row's (predicted inside its tree).
    scored_own = valid & ((arange > shared[:, None]) | (shared[:, None] == 0))
    scored_at = _resolve(own_index, scored_own, valid & ~scored_own, source)

    flat = packed_rows * packed_width
    own_position = torch.zeros(flat, device=device, dtype=torch.long)
    own_flat = own_index[own_tokens]
    own_position[own_flat] = arange.expand(rows, width)[own_tokens]
    packed_ids = torch.zeros(flat, device=device, dtype=input_ids.dtype)
    packed_ids[own_flat] = aligned[own_tokens]
    segment_start = torch.zeros(flat, device=device, dtype=torch.bool)
    segment_start[base[lengths > 0]] = True

    if blocks:
        visible, attention_blocks = None, _blocks(where, base_list, own_list, length_list, kept)
    else:
        visible = _tree_mask(
            base_list, own_list, kept, source_list, bin_tokens, packed_width, device
        )
        attention_blocks = None
    row_of = index[:, None].expand(rows, width)

    def to_columns(values: Tensor) -> Tensor:
        out = torch.full_like(values, -1)
        out[row_of[valid], columns[valid]] = values[valid]
        return out

    return PackedLayout(
        input_ids=packed_ids.view(packed_rows, packed_width),
        position_ids=own_position.view(packed_rows, packed_width),
        visible=visible,
        where=to_columns(where),
        scored_at=to_columns(scored_at),
        segment_start=segment_start.view(packed_rows, packed_width),
        padded_tokens=rows * width,
        packed_tokens=sum(own_list),
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


def attention_cost(model: nn.Module) -> float:
    """One (query, key) pair of masked attention relative to one token through the model's
    matmuls: ``4 d`` FLOPs per pair and layer (scores and weighted values) over ``2 N / n``
    per token and layer (``N`` non-embedding parameters, ``n`` layers), i.e. ``2 d n / N``
    (3.3e-4 for SmolLM2-135M; measured on CPU: 4e-4). The model's modules are scanned once:
    the packing decisions assume its architecture does not change afterwards."""
    from alignkit.models.forward import innermost_model

    return _attention_cost(_structure(innermost_model(model)))


def _attention_cost(structure: _Structure) -> float:
    if not structure.hidden or not structure.layers or not structure.parameters:
        return 0.0
    return 2.0 * structure.hidden * structure.layers / structure.parameters


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


def _blocks(
    where: Tensor, base: list[int], own: list[int], lengths: list[int], shared: list[int]
) -> tuple[AttentionBlock, ...]:
    """Each row's own tokens in the one packed row, in packed order: causal on their own when
    the row shares nothing, else against its whole sequence's keys (``where[r, :length]``: the
    shared prefix's copies, then its own) with the causal rule offset by the prefix."""
    out = []
    for row in sorted(range(len(base)), key=base.__getitem__):
        start, count, length, prefix = base[row], own[row], lengths[row], shared[row]
        if count == 0:
            continue
        if prefix == 0:
            out.append(AttentionBlock(start, start + count))
            continue
        positions = torch.arange(length, device=where.device)
        visible = positions[None, :] <= positions[prefix:, None]
        out.append(AttentionBlock(start, start + count, where[row, :length], visible))
    return tuple(out)


def _tree_mask(
    base: list[int],
    own: list[int],
    shared: list[int],
    source: list[int],
    bin_tokens: list[int],
    width: int,
    device: torch.device,
) -> Tensor:
    """``[P, 1, L, L]``: query ``q`` (row ``r``'s token at position ``p``) sees key ``k`` (at
    position ``p'``) iff ``p' <= p`` and ``k`` stands for row ``r``'s token ``p'``: its own
    sequence causally, including the prefix it shares. A pad query sees itself (no NaN softmax).

    Built from rectangles: row ``r``'s own tokens (flat start ``base[r]``, ``own[r]`` of them,
    positions ``shared[r]..``) see themselves causally and, whole, each ancestor's own tokens
    that stand for positions below ``shared[r]`` (all earlier than their own positions): the
    source's positions ``shared[a] .. bound``, the bound shrinking down the chain."""
    visible = torch.zeros(len(bin_tokens), width, width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    for r, count in enumerate(own):
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
    for row, used in enumerate(bin_tokens):
        visible[row].diagonal()[used:] = True
    return visible[:, None]


# ----------------------------------------------------------------------------- model side


def packable_model(model: nn.Module, longest: int | None = None) -> bool:
    """Whether ``model`` (its innermost module, inside DDP/FSDP/peft wrappers) runs a packed
    batch exactly: a transformers decoder (``transformers.models.*`` forward, causal, not
    encoder-decoder) that takes ``position_ids`` and uses eager or sdpa attention, which take
    a 4D mask as given, with no sliding window shorter than ``longest`` (the longest sequence;
    None: any window) since the packed masks are plain causal. Others (flash-attention, ALiBi
    models, encoders, custom code) are not packed."""
    from alignkit.models.forward import innermost_model

    inner = innermost_model(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    structure = _structure(inner)
    window = structure.window
    window_cuts = window is not None and (longest is None or longest > window)
    return structure.causal and _packable_class(type(inner)) and not window_cuts


@dataclass(frozen=True)
class _Structure:
    """What the packing decisions read from a model's modules, scanned once per model."""

    causal: bool  # a causal attention module (a bidirectional encoder gets no causal mask)
    window: int | None  # the shortest active sliding window
    parameters: int  # outside the embeddings and the LM head
    layers: int
    hidden: int


_STRUCTURES: weakref.WeakKeyDictionary[nn.Module, _Structure] = weakref.WeakKeyDictionary()


def _structure(inner: nn.Module) -> _Structure:
    found = _STRUCTURES.get(inner)
    if found is None:
        found = _STRUCTURES[inner] = _scan(inner)
    return found


def _scan(inner: nn.Module) -> _Structure:
    config = inner.config
    modules = list(inner.modules())
    windows = [m.sliding_window for m in modules if hasattr(m, "sliding_window")]
    if not windows and getattr(config, "use_sliding_window", True):
        windows = [getattr(config, "sliding_window", None)]
    active = [w for w in windows if isinstance(w, int)]
    embeddings = {id(m.weight) for m in modules if isinstance(m, nn.Embedding)}
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None:  # runs on the scored rows only
        embeddings.add(id(head.weight))
    return _Structure(
        causal=any(getattr(m, "is_causal", None) is True for m in modules),
        window=min(active) if active else None,
        parameters=sum(p.numel() for p in inner.parameters() if id(p) not in embeddings),
        layers=getattr(config, "num_hidden_layers", None) or 0,
        hidden=getattr(config, "hidden_size", None) or 0,
    )


def packing_options(model: nn.Module) -> dict:
    """Keyword arguments of :func:`pack_rows` for ``model``: its :func:`attention_cost`, block
    attention allowed where
    :func:`~alignkit.models.block_attention.block_attention_available`, and the cost of one
    attention call in tokens: ``_CALL_FLOPS`` (about 60 us of forward and backward call
    overhead at 100 GFLOP/s) over a token's ``6 N / n`` FLOPs through one layer (``N``
    non-embedding parameters, ``n`` layers): 20 tokens on the tiny preset, 0.3 on SmolLM2-135M."""
    from alignkit.models.forward import innermost_model

    structure = _structure(innermost_model(model))
    parameters, layers = structure.parameters, structure.layers
    return {
        "attention_cost": _attention_cost(structure),
        "blocks": block_attention_available(model),
        "call_cost": _CALL_FLOPS * layers / (6.0 * parameters) if parameters else 0.0,
    }


def packed_attention(model: nn.Module, layout: PackedLayout):
    """The context a forward of ``model`` on ``packed_model_inputs(model, layout)`` runs in:
    block attention switched on for a layout with blocks, else nothing."""
    return block_attention(model, active=layout.blocks is not None)


@functools.cache
def _packable_class(model_class: type) -> bool:
    owner = next((c for c in model_class.__mro__ if "forward" in vars(c)), None)
    if owner is None or not owner.__module__.startswith("transformers.models."):
        return False
    parameters = inspect.signature(owner.forward).parameters
    return "position_ids" in parameters and "use_cache" in parameters


def packed_model_inputs(model: nn.Module, layout: PackedLayout, dtype: torch.dtype) -> dict:
    """Keyword arguments running ``model`` on ``layout``: ids, positions, no cache, and the 4D
    mask in the form the attention implementation adds or selects with, or the attention
    blocks (then the forward runs inside :func:`packed_attention`)."""
    from alignkit.models.forward import innermost_model

    if layout.blocks is not None:
        return {
            "input_ids": layout.input_ids,
            "position_ids": layout.position_ids,
            "use_cache": False,
            "alignkit_blocks": layout.blocks,
        }
    assert layout.visible is not None
    mask: Tensor = layout.visible
    if innermost_model(model).config._attn_implementation == "eager":
        # eager attention adds the mask to the scores.
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return {
        "input_ids": layout.input_ids,
        "attention_mask": mask,
        "position_ids": layout.position_ids,
        "use_cache": False,
    }
