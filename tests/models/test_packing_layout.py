"""models.packing.layout without a model: every layout checked against a brute-force reading.

For each real token ``(r, p)`` (row ``r``'s ``p``-th real token) a layout says where its key
lives (``where``) and where its log-prob is predicted (``scored_at``). The attention a packed
query may take is then fixed by the padded batch alone: the query standing for ``(r, p)`` sees
exactly the keys standing for ``(r, 0..p)``. These tests rebuild that from ``where`` by loops and
compare it with the layout's tree mask or attention blocks, on hand-made and random batches.
"""

from __future__ import annotations

import random

import pytest
import torch

from alignkit.models.packing.layout import PackedLayout, pack_rows, segments_layout


def _real_tokens(attention_mask: torch.Tensor) -> list[list[int]]:
    """The padded columns of each row's real tokens, in order."""
    return [row.nonzero().squeeze(-1).tolist() for row in attention_mask]


def _expected_visibility(layout: PackedLayout, attention_mask: torch.Tensor) -> dict[int, set]:
    """Packed query (flat index) -> the flat keys it must see, from ``where`` by loops.

    Several tokens share a packed position (a shared prefix); they must agree on its keys.
    """
    expected: dict[int, set] = {}
    for r, columns in enumerate(_real_tokens(attention_mask)):
        for p, column in enumerate(columns):
            query = int(layout.where[r, column])
            keys = {int(layout.where[r, c]) for c in columns[: p + 1]}
            assert expected.setdefault(query, keys) == keys, (r, p)
    return expected


def _mask_from_blocks(layout: PackedLayout) -> torch.Tensor:
    """The ``[L, L]`` visibility that the attention blocks of a one-row layout stand for."""
    width = layout.input_ids.shape[1]
    mask = torch.zeros(width, width, dtype=torch.bool)
    assert layout.blocks is not None
    for block in layout.blocks:
        count = block.end - block.start
        if block.keys is None:
            rows = mask[block.start : block.end]
            rows[:, block.start : block.end] = torch.ones(count, count, dtype=torch.bool).tril()
        else:
            assert block.visible is not None and block.visible.shape == (count, len(block.keys))
            for q in range(count):
                mask[block.start + q, block.keys[block.visible[q]]] = True
    return mask


def check_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: PackedLayout):
    """Tokens, positions, scoring positions and attention of ``layout`` against the padded batch."""
    real = attention_mask.bool()
    packed_ids = layout.input_ids.reshape(-1)
    positions = layout.position_ids.reshape(-1)
    starts = layout.segment_start.reshape(-1)
    expected = _expected_visibility(layout, attention_mask)
    assert (layout.where < 0).equal(~real) and (layout.scored_at < 0).equal(~real)
    assert layout.packed_tokens == len(expected) <= int(real.sum())
    assert layout.padded_tokens == input_ids.numel()
    assert torch.equal(layout.unpack(layout.input_ids), input_ids.masked_fill(~real, 0))
    for r, columns in enumerate(_real_tokens(attention_mask)):
        for p, column in enumerate(columns):
            key, scored = int(layout.where[r, column]), int(layout.scored_at[r, column])
            assert packed_ids[key] == input_ids[r, column] and positions[key] == p
            assert packed_ids[scored] == input_ids[r, column] and positions[scored] == p
            # What predicts the token is the position before it in the packed row: the same
            # sequence's previous token, or nothing at a sequence's first token.
            assert bool(starts[scored]) == (p == 0)
            if p > 0:
                assert packed_ids[scored - 1] == input_ids[r, columns[p - 1]]
                assert positions[scored - 1] == p - 1
    rows, width = layout.input_ids.shape
    if layout.blocks is None:
        assert layout.visible is not None and layout.visible.shape == (rows, 1, width, width)
        visible = layout.visible[:, 0].reshape(rows * width, width)
    else:
        assert rows == 1 and layout.visible is None
        visible = _mask_from_blocks(layout)
    for query in range(rows * width):
        row = query // width
        seen = {row * width + k for k in visible[query].nonzero().squeeze(-1).tolist()}
        assert seen == expected.get(query, {query}), query  # a pad query sees itself


def test_a_pair_keeps_the_last_prompt_token_and_attends_to_the_chosen_rows_prompt() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 10, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    layout = pack_rows(ids, mask)
    assert layout is not None and layout.blocks is None
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 10]]
    check_layout(ids, mask, layout)
    with_blocks = pack_rows(ids, mask, blocks=True)
    assert with_blocks is not None and with_blocks.visible is None
    assert [(b.start, b.end, b.keys is None) for b in with_blocks.blocks] == [
        (0, 5, True),
        (5, 7, False),
    ]
    check_layout(ids, mask, with_blocks)


def test_a_chain_of_shared_prefixes_resolves_to_the_first_copy() -> None:
    """Row 2 shares four tokens with row 1, which shares two with row 0: row 2's first two
    tokens live in row 0, the next two in row 1."""
    ids = torch.tensor(
        [[1, 2, 3, 9, 9, 9], [1, 2, 3, 4, 5, 8], [1, 2, 3, 4, 5, 6], [0, 0, 7, 7, 1, 2]]
    )
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    )
    layout = pack_rows(ids, mask)
    assert layout is not None
    assert layout.where[2, :2].tolist() == layout.where[0, :2].tolist()
    assert layout.where[2, 2:4].tolist() == layout.where[1, 2:4].tolist()
    assert layout.packed_tokens == 5 + 4 + 2 + 4
    check_layout(ids, mask, layout)
    unshared = pack_rows(ids, mask, share_prefixes=False)
    assert unshared is not None and unshared.packed_tokens == int(mask.sum())
    check_layout(ids, mask, unshared)


def test_left_padded_rows_spread_over_packed_rows_keep_their_trees_whole() -> None:
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 3, 4, 5, 7], [8, 9, 10, 11, 12, 13]])
    mask = (ids != 0).long()
    layout = pack_rows(ids, mask, attention_cost=0.1)
    assert layout is not None and layout.input_ids.shape[0] == 2
    packed_row = layout.where // layout.input_ids.shape[1]
    assert packed_row[0, 2] == packed_row[1, 5] != packed_row[2, 0]
    check_layout(ids, mask, layout)


def test_block_attention_is_taken_only_when_its_calls_cost_less() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [10, 11, 0, 0]])
    mask = (ids != 0).long()
    cheap = pack_rows(ids, mask, blocks=True, call_cost=0.0)
    assert cheap is not None and cheap.blocks is not None and len(cheap.blocks) == 3
    # Three calls of 10 tokens each against one masked call over the packed row.
    costly = pack_rows(ids, mask, blocks=True, call_cost=10.0)
    assert costly is not None and costly.blocks is None
    for layout in (cheap, costly):
        check_layout(ids, mask, layout)


def test_pack_scored_marks_the_packed_positions_whose_logprobs_are_read() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 10, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    scored = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])  # the kept token 7 is scored too
    layout = pack_rows(ids, mask)
    assert layout is not None
    packed = layout.pack_scored(scored).reshape(-1)
    assert packed.nonzero().squeeze(-1).tolist() == sorted(
        {int(layout.scored_at[r, c]) for r, c in scored.nonzero().tolist()}
    )
    assert not bool(layout.pack_scored(torch.tensor([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])).any())


def _random_batch(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows drawn from a few prompts that extend each other (chains of shared prefixes), some
    answers starting alike, left, right or no padding."""
    stems = [[rng.randint(1, 6) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    stems += [s + [rng.randint(1, 6) for _ in range(rng.randint(1, 4))] for s in stems]
    rows = [
        rng.choice(stems) + [rng.randint(1, 9) for _ in range(rng.randint(0, 6))]
        for _ in range(rng.randint(1, 7))
    ]
    width = max(len(r) for r in rows) + rng.randint(0, 2)
    side = rng.choice(["left", "right"])
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        ids[i, start : start + len(row)] = torch.tensor(row)
        mask[i, start : start + len(row)] = 1
    return ids, mask


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_pack_exactly_under_every_option(seed: int) -> None:
    rng = random.Random(seed)
    packed = 0
    for _ in range(40):
        ids, mask = _random_batch(rng)
        for options in (
            {},
            {"share_prefixes": False},
            {"attention_cost": rng.choice([1e-3, 0.05, 0.5])},
            {"blocks": True, "attention_cost": 0.01, "call_cost": rng.choice([0.0, 5.0])},
        ):
            layout = pack_rows(ids, mask, **options)
            if layout is not None:
                packed += 1
                check_layout(ids, mask, layout)
    assert packed > 100  # most random batches have padding or a shared prefix to remove


def test_segments_layout_makes_one_block_per_sequence() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 0]])
    real = ids != 0
    layout = segments_layout(ids, positions, real)
    assert layout is not None and layout.input_ids.tolist() == [[*range(5, 15)]]
    assert [(b.start, b.end, b.keys) for b in layout.blocks] == [
        (0, 3, None),
        (3, 6, None),
        (6, 10, None),
    ]
    assert layout.where.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, -1, -1]]
    assert layout.segment_start.tolist() == [[1, 0, 0, 1, 0, 0, 1, 0, 0, 0]]
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()
    assert segments_layout(ids, positions, left) is None  # only right padding keeps order
