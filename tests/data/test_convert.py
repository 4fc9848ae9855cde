"""`alignkit data convert`: ratings to pairs, pairwise ties, PKU <-> flattened, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.loaders import load_records


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _convert(src: Path, dst: Path, *args: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["data", "convert", str(src), str(dst), *args])
    assert info.value.code == 0


def test_ratings_to_pairs_with_gap_and_cap(tmp_path: Path) -> None:
    ratings = [
        {"prompt": "p", "response": "a", "rating": 5},
        {"prompt": "p", "response": "b", "rating": 1},
        {"prompt": "p", "response": "c", "rating": 4.8},
        {"prompt": "q", "response": "x", "rating": 2},
        {"prompt": "q", "response": "y", "rating": 2.2},
    ]
    out = tmp_path / "pairs.jsonl"
    _convert(
        _write(tmp_path / "r.jsonl", ratings),
        out,
        "--from",
        "ratings",
        "--to",
        "preference",
        "--min-gap",
        "0.5",
        "--max-pairs-per-prompt",
        "1",
    )
    assert _read(out) == [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 4.0}]
    load_records(out, "preference")  # trains directly


def test_pairwise_ties_dropped_or_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"prompt": "p", "response_a": "a", "response_b": "b", "preference": 1, "id": 1},
        {"prompt": "p", "response_a": "c", "response_b": "d", "preference": 0, "id": 2},
        {"prompt": "p", "response_a": "e", "response_b": "f", "preference": 0.5, "id": 3},
    ]
    src = _write(tmp_path / "pw.jsonl", rows)
    dropped = tmp_path / "dropped.jsonl"
    _convert(src, dropped, "--from", "pairwise", "--to", "preference")
    assert "1 tie(s) dropped" in capsys.readouterr().out
    assert _read(dropped) == [
        {"prompt": "p", "chosen": "a", "rejected": "b", "id": 1},
        {"prompt": "p", "chosen": "d", "rejected": "c", "id": 2},
    ]
    kept = tmp_path / "kept.jsonl"
    _convert(src, kept, "--from", "pairwise", "--to", "preference", "--keep-ties")
    assert [r["margin"] for r in _read(kept)] == [1.0, 1.0, 0.0]
    load_records(kept, "preference")
    # back to pairwise: same judgements, the better response first, the tie a tie
    back = tmp_path / "back.jsonl"
    _convert(kept, back, "--from", "preference", "--to", "pairwise")
    assert [(r["response_a"], r["response_b"], r["preference"]) for r in _read(back)] == [
        ("a", "b", 1.0),
        ("d", "c", 1.0),
        ("e", "f", 0.5),
    ]


def test_preference_round_trip_is_lossless(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.0, "source": "x"},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": "c",
            "rejected": "d",
            "margin": 0.0,
            "source": "y",
        },
    ]
    src = _write(tmp_path / "pref.jsonl", rows)
    _convert(src, tmp_path / "pw.jsonl", "--from", "preference", "--to", "pairwise")
    _convert(
        tmp_path / "pw.jsonl",
        tmp_path / "back.jsonl",
        "--from",
        "pairwise",
        "--to",
        "preference",
        "--keep-ties",
    )
    assert _read(tmp_path / "back.jsonl") == rows


def test_pku_round_trips(tmp_path: Path) -> None:
    pku = [
        {
            "prompt": "p",
            "response_0": "a",
            "response_1": "b",
            "better_response_id": 1,
            "safer_response_id": 0,
            "is_response_0_safe": True,
            "is_response_1_safe": False,
            "category": "x",
        },
        {
            "prompt": "q",
            "response_0": "c",
            "response_1": "d",
            "better_response_id": 0,
            "safer_response_id": 1,
            "is_response_0_safe": True,
            "is_response_1_safe": True,
            "category": "y",
        },
    ]
    src = _write(tmp_path / "pku.jsonl", pku)
    flat = tmp_path / "flat.jsonl"
    _convert(src, flat, "--from", "pku", "--to", "safety")
    assert _read(flat) == [
        {
            "prompt": "p",
            "chosen": "b",
            "rejected": "a",
            "chosen_safety": -1.5,
            "rejected_safety": 1.5,
            "category": "x",
        },
        {
            "prompt": "q",
            "chosen": "c",
            "rejected": "d",
            "chosen_safety": 0.5,
            "rejected_safety": 1.5,
            "category": "y",
        },
    ]
    back = tmp_path / "back.jsonl"
    _convert(flat, back, "--from", "safety", "--to", "pku")
    # the same judgements, with the better response first
    assert _read(back)[0] == {
        "prompt": "p",
        "response_0": "b",
        "response_1": "a",
        "better_response_id": 0,
        "safer_response_id": 1,
        "is_response_0_safe": False,
        "is_response_1_safe": True,
        "category": "x",
    }
    assert _read(back)[1] == pku[1]
    again = tmp_path / "again.jsonl"
    _convert(back, again, "--from", "pku", "--to", "safety")
    assert _read(again) == _read(flat)


def test_invalid_input_exits_2_naming_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write(tmp_path / "r.jsonl", [{"prompt": "p", "response": "a"}])
    with pytest.raises(SystemExit) as info:
        main(
            [
                "data",
                "convert",
                str(src),
                str(tmp_path / "o.jsonl"),
                "--from",
                "ratings",
                "--to",
                "preference",
            ]
        )
    assert info.value.code == 2
    assert "r.jsonl:1: field 'rating': missing field" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
