"""Packing: rows fill up, examples stay apart (same logits as unpacked), labels are exact."""

from __future__ import annotations

import torch

from alignkit.data.packing import PackedSFTCollator, pack_examples
from alignkit.data.tokenize import IGNORE_INDEX


def _example(n: int, prompt: int, start: int) -> dict[str, list[int]]:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def test_pack_fills_rows_first_fit_and_keeps_every_token() -> None:
    examples = [_example(n, 1, 10 * i + 5) for i, n in enumerate([6, 3, 5, 2, 4])]
    rows = pack_examples(examples, max_length=8)
    assert [r["segment_lengths"] for r in rows] == [[6, 2], [5, 3], [4]]
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(
        t for e in examples for t in e["input_ids"]
    )
    assert all(len(r["input_ids"]) <= 8 for r in rows)


def test_packed_forward_equals_separate_forwards() -> None:
    from alignkit.models import load_policy

    model, _ = load_policy("tiny", seed=1)
    examples = [_example(7, 2, 20), _example(5, 1, 300), _example(6, 3, 600)]
    rows = pack_examples(examples, max_length=12)
    batch = PackedSFTCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        for b, row in enumerate(rows):
            offset = 0
            for length in row["segment_lengths"]:
                ids = torch.tensor([row["input_ids"][offset : offset + length]])
                alone = model(input_ids=ids).logits[0]
                assert torch.allclose(packed[b, offset : offset + length], alone, atol=1e-5)
                offset += length


def test_packed_labels_never_predict_across_examples() -> None:
    rows = pack_examples([_example(3, 0, 5), _example(3, 0, 50)], max_length=6)
    batch = PackedSFTCollator(pad_token_id=0)(rows)
    # Prompts of length 0 would make the next example's first token a target; it is masked.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 51, 52]]
    assert int(batch["num_tokens"]) == 6
