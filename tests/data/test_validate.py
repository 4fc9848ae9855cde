"""`alignkit data validate`: every problem at once, 1-based rows and fields, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.validate import detect_format, validate_file


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _problems(path: Path, fmt: str | None = None) -> list[tuple[int, str, str]]:
    return [(p.row, p.field, p.message) for p in validate_file(path, fmt).problems]


def test_each_malformed_case_is_reported_with_row_and_field(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = _write(
        tmp_path / "pairs.jsonl",
        [
            good,
            json.dumps({"prompt": "p", "chosen": "a"}),  # 2: missing field
            json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}),  # 3: wrong type
            json.dumps({"prompt": "  ", "chosen": "a", "rejected": "b"}),  # 4: empty text
            '{"prompt": "p", "chosen": ',  # 5: invalid JSON
            json.dumps({"prompt": "p", "chosen": "same  text", "rejected": "same text"}),  # 6
            good,
        ],
    )
    problems = _problems(path, "preference")
    assert [(row, field) for row, field, _ in problems] == [
        (2, "rejected"),
        (3, "chosen"),
        (4, "prompt"),
        (5, "<row>"),
        (6, "rejected"),
    ]
    messages = [m for _, _, m in problems]
    assert messages[0] == "missing field"
    assert messages[1] == "expected a string, got integer"
    assert messages[2] == "empty string"
    assert messages[3].startswith("invalid JSON")
    assert messages[4] == "identical to chosen"


def test_pairwise_and_ratings_problems(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "pw.jsonl",
        [
            json.dumps({"prompt": "p", "response_a": "a", "response_b": "b", "preference": 0.5}),
            json.dumps({"prompt": "p", "response_a": "a", "response_b": "b", "preference": 0.7}),
            json.dumps({"prompt": "p", "response_b": "b", "preference": 1}),
        ],
    )
    assert _problems(path) == [
        (2, "preference", "expected 0, 0.5 or 1, got 0.7"),
        (3, "response_a", "missing field"),
    ]
    ratings = _write(
        tmp_path / "r.jsonl", [json.dumps({"prompt": "p", "response": "a", "rating": "x"})]
    )
    assert _problems(ratings) == [(1, "rating", "expected a number, got string")]


def test_mixed_margins_are_reported_on_the_rows_without(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "m.jsonl",
        [
            json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1}),
            json.dumps({"prompt": "p", "chosen": "a", "rejected": "c"}),
        ],
    )
    assert _problems(path) == [(2, "margin", "missing here but given in 1 other rows")]


def test_detect_format() -> None:
    assert detect_format([{"prompt": "p", "response_0": "a"}]) == "safety"
    assert detect_format([{"prompt": "p", "chosen": "a", "rejected": "b"}]) == "preference"
    assert detect_format([{"prompt": "p", "response": "a", "rating": 1}]) == "ratings"
    assert detect_format([{"messages": []}]) == "sft"
    assert detect_format([3, {"prompt": "p"}]) == "prompt"


def test_cli_exit_codes_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = _write(tmp_path / "ok.jsonl", [json.dumps({"prompt": "p", "completion": "c"})] * 3)
    with pytest.raises(SystemExit) as info:
        main(["data", "validate", str(clean)])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{clean}: 3 rows, format sft, no problems"]

    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "p"}), "[1"])
    with pytest.raises(SystemExit) as info:
        main(["data", "validate", str(bad), "--format", "sft"])
    assert info.value.code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"{bad}:1: field 'completion': missing field"
    assert out[-1] == f"{bad}: 2 problem(s) in 2 of 2 rows (format sft)"
