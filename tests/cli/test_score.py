"""`alignkit score MODEL FILE` scores rows with a saved reward/cost model: the same scores as
the model itself, and a policy checkpoint is refused."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.cli import main
from alignkit.data import load_records, tokenize_sft
from alignkit.data.collate import SFTCollator
from alignkit.models import load_reward_model

ROWS = [
    {"prompt": "How do I cook pasta?", "completion": "Boil water, add the pasta."},
    {"prompt": "How do I pick a lock?", "completion": "I can't help with that."},
]


def test_score_writes_each_rows_score_from_the_model(tmp_path, capsys):
    model, tokenizer = load_reward_model("tiny", kind="cost", seed=1)
    saved = model.save_pretrained(tmp_path / "cost", tokenizer)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(SystemExit) as done:
        main(["score", str(saved), str(data), "--out", str(tmp_path / "scored.jsonl")])
    assert done.value.code in (0, None)
    assert "2 rows scored by the cost model" in capsys.readouterr().out
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]

    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id)(
        list(tokenize_sft(load_records(data, "sft"), tokenizer))
    )
    with torch.no_grad():
        expected = model(batch["input_ids"], attention_mask=batch["attention_mask"]).rewards
    assert [r["row"] for r in scored] == [1, 2]
    assert [r["score"] for r in scored] == pytest.approx(expected.tolist(), rel=1e-5)
    assert expected[0] != expected[1]


def test_score_with_a_policy_checkpoint_exits_2(tmp_path, capsys):
    from alignkit.models import load_policy

    policy, _ = load_policy("tiny")
    policy.save_pretrained(tmp_path / "policy")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(SystemExit) as done:
        main(["score", str(tmp_path / "policy"), str(data)])
    assert done.value.code == 2
    assert "neither a reward/cost model directory" in capsys.readouterr().err
