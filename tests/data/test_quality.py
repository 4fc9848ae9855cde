"""`alignkit data check`: every row in exactly one output, each rejection with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.quality import repeated_ngram_share


def _pair(prompt: str, chosen: str, rejected: str, **extra: object) -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra})


def test_repeated_ngram_share() -> None:
    assert repeated_ngram_share("a b c d", 2) == 0.0
    # "a b" x 3 -> bigrams ab, ba, ab, ba, ab: 2 distinct of 5
    assert repeated_ngram_share("a b a b a b", 2) == pytest.approx(1 - 2 / 5)
    assert repeated_ngram_share("a", 3) == 0.0


def test_check_sorts_every_row_into_exactly_one_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        _pair("What is 2+2?", "It is four.", "It is five."),  # 1 kept
        _pair("Say hi", "hello there", "hello there"),  # 2 identical
        _pair("q1", "ok " * 20, "a fine answer"),  # 3 repeated n-grams
        _pair(
            "Tell me about the history of Rome please",
            "Tell me about the history of Rome please",
            "Rome was founded in 753 BC.",
        ),  # 4 echo
        _pair("q2", "good", "bad", margin=0.1),  # 5 low margin
        "{broken",  # 6 invalid JSON
        _pair("What is 2+2?", "It is four.", "It is five."),  # 7 duplicate of 1
        _pair("q3", "yes", "no"),  # 8 vote yes
        _pair("q3", "yes", "no"),  # 9 vote yes (duplicate of 8)
        _pair("q3", "no", "yes"),  # 10 minority vote
        _pair("q4", "", "no"),  # 11 empty response
        _pair("q5", "left", "right"),  # 12 tie vote: share 0.5
        _pair("q5", "right", "left"),  # 13
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    kept, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl"
    with pytest.raises(SystemExit) as info:
        main(
            [
                "data",
                "check",
                str(src),
                "--kept",
                str(kept),
                "--rejected",
                str(rejected),
                "--min-margin",
                "0.5",
            ]
        )
    assert info.value.code == 0
    kept_rows = [json.loads(x) for x in kept.read_text().splitlines()]
    rejected_rows = [json.loads(x) for x in rejected.read_text().splitlines()]
    assert len(kept_rows) + len(rejected_rows) == len(lines)
    reasons = {r["row"]: r["reasons"] for r in rejected_rows}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]
    assert kept_rows == [json.loads(lines[0]), json.loads(lines[7])]
    assert reasons[2] == ["degenerate: chosen identical to rejected"]
    assert reasons[3][0].startswith("degenerate: chosen repeats 3-grams")
    assert reasons[4] == ["degenerate: chosen echoes the prompt"]
    assert reasons[5] == ["margin: 0.1 < 0.5"]
    assert reasons[6][0].startswith("invalid: invalid JSON")
    assert reasons[7] == ["duplicate: of row 1"]
    assert reasons[9] == ["duplicate: of row 8"]
    assert reasons[10] == ["agreement: minority vote (majority share 0.67)"]
    assert reasons[11] == ["invalid: field 'chosen': empty string"]
    assert reasons[12] == reasons[13] == ["agreement: majority share 0.50 < 0.6"]
    assert all(
        r["data"] == (None if r["row"] == 6 else json.loads(lines[r["row"] - 1]))
        for r in rejected_rows
    )
    summary = capsys.readouterr().out
    assert "kept 2 of 13 rows, rejected 11" in summary
    # rows 1/7, 8/9/10 and 12/13 judge the same pair: shares 1, 2/3, 1/2
    assert "3 multiply-labelled pairs: majority share 0.722" in summary
    # "It is four." is as long as "It is five."; "yes" is longer than "no"
    assert "chosen longer in 50.0% of kept pairs" in summary
