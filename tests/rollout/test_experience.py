"""Experience: row selection keeps every field aligned; mini-batches are seeded permutations."""

from __future__ import annotations

import pytest
import torch

from alignkit.rollout import Experience


def _experience(n: int = 10, prompt_width: int = 3, response: int = 4) -> Experience:
    t = prompt_width + response
    row = torch.arange(n, dtype=torch.float32)[:, None]
    return Experience(
        # Every field encodes its row number, so misalignment is visible.
        input_ids=torch.arange(n)[:, None].repeat(1, t),
        attention_mask=torch.ones(n, t, dtype=torch.long),
        response_mask=torch.arange(t)[None, :].repeat(n, 1) >= prompt_width,
        prompt_width=prompt_width,
        behaviour_logprobs=-row.repeat(1, t),
        scores=torch.arange(n, dtype=torch.float32) * 10,
        group_index=torch.arange(n) // 2,
        response_lengths=torch.full((n,), response),
        truncated=torch.arange(n) % 3 == 0,
        prompts=[f"p{i}" for i in range(n)],
        completions=[f"c{i}" for i in range(n)],
        row_fields=[{"answer": i} for i in range(n)],
        advantages=row.repeat(1, t) + 0.5,
    )


def _assert_aligned(exp: Experience) -> list[int]:
    rows = exp.input_ids[:, 0].tolist()
    assert exp.behaviour_logprobs[:, 0].tolist() == [-float(r) for r in rows]
    assert exp.scores.tolist() == [10.0 * r for r in rows]
    assert exp.group_index.tolist() == [r // 2 for r in rows]
    assert exp.truncated.tolist() == [r % 3 == 0 for r in rows]
    assert exp.prompts == [f"p{r}" for r in rows]
    assert exp.completions == [f"c{r}" for r in rows]
    assert [f["answer"] for f in exp.row_fields] == rows
    assert exp.advantages is not None and exp.advantages[:, -1].tolist() == [r + 0.5 for r in rows]
    assert exp.old_logprobs is None
    return rows


def test_select_keeps_rows_aligned() -> None:
    picked = _experience().select(torch.tensor([7, 2, 2, 9]))
    assert _assert_aligned(picked) == [7, 2, 2, 9]
    assert picked.prompt_width == 3 and len(picked) == 4


def test_split_is_in_order_and_covers_every_row() -> None:
    chunks = _experience().split(4)
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert [r for c in chunks for r in _assert_aligned(c)] == list(range(10))


def test_minibatches_are_a_seeded_permutation() -> None:
    exp = _experience()
    batches = list(exp.minibatches(3, torch.Generator().manual_seed(4)))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    order = [r for b in batches for r in _assert_aligned(b)]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    again = [
        r
        for b in exp.minibatches(3, torch.Generator().manual_seed(4))
        for r in b.input_ids[:, 0].tolist()
    ]
    other = [
        r
        for b in exp.minibatches(3, torch.Generator().manual_seed(5))
        for r in b.input_ids[:, 0].tolist()
    ]
    assert again == order and other != order
    torch.manual_seed(123)  # the global RNG does not influence the order
    third = [
        r
        for b in exp.minibatches(3, torch.Generator().manual_seed(4))
        for r in b.input_ids[:, 0].tolist()
    ]
    assert third == order


def test_cat_aligns_different_widths_on_the_prompt_boundary() -> None:
    a = _experience(n=2, prompt_width=3, response=4)
    b = _experience(n=3, prompt_width=5, response=2)
    both = Experience.cat([a, b])
    assert both.prompt_width == 5 and both.width == 9 and len(both) == 5
    # a's rows gained 2 masked columns on the left and none on the right; b's 2 on the right
    assert both.attention_mask[:2].tolist() == [[0, 0] + [1] * 7] * 2
    assert both.attention_mask[2:].tolist() == [[1] * 7 + [0, 0]] * 3
    assert torch.equal(both.response_mask[:2, 5:], a.response_mask[:, 3:])
    assert both.response_mask.sum().item() == 2 * 4 + 3 * 2
    assert both.prompts == ["p0", "p1", "p0", "p1", "p2"]
    assert torch.equal(both.to("cpu").input_ids, both.input_ids)


def test_shapes_are_checked() -> None:
    exp = _experience()
    with pytest.raises(ValueError, match="scores has shape"):
        Experience(**{**exp.__dict__, "scores": torch.zeros(3)})
    with pytest.raises(ValueError, match="completions has 2 rows"):
        Experience(**{**exp.__dict__, "completions": ["a", "b"]})
    with pytest.raises(ValueError, match="episodes has 1 rows"):
        Experience(**{**exp.__dict__, "episodes": ["e"]})


def test_episodes_follow_their_rows_when_set() -> None:
    exp = _experience(n=4)
    assert exp.select([1]).episodes is None and Experience.cat([exp, exp]).episodes is None
    with_episodes = Experience(**{**exp.__dict__, "episodes": [f"e{i}" for i in range(4)]})
    assert with_episodes.select([3, 0, 0]).episodes == ["e3", "e0", "e0"]
    assert [c.episodes for c in with_episodes.split(3)] == [["e0", "e1", "e2"], ["e3"]]
    both = Experience.cat([with_episodes, with_episodes.select([2])])
    assert both.episodes == ["e0", "e1", "e2", "e3", "e2"]
    assert both.to("cpu").episodes == both.episodes
    with pytest.raises(ValueError, match="episodes is set in some parts only"):
        Experience.cat([with_episodes, exp])
