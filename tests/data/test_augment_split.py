"""`alignkit data augment --transitivity` and `alignkit data split`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.augment import transitive_pairs
from alignkit.data.split import split_by_prompt
from alignkit.data.validate import ValidatedRow


def _rows(pairs: list[tuple[str, str, str, float]]) -> list[ValidatedRow]:
    out = []
    for i, (prompt, a, b, m) in enumerate(pairs, start=1):
        raw = {"prompt": prompt, "chosen": a, "rejected": b, "margin": m}
        out.append(ValidatedRow(i, raw, dict(raw)))
    return out


def test_transitivity_derives_with_reduced_margin_and_never_contradicts() -> None:
    rows = _rows(
        [
            ("p", "a", "b", 2.0),
            ("p", "b", "c", 1.0),
            ("p", "c", "d", 4.0),
            ("p", "d", "a", 1.0),  # planted contradiction: closes a > b > c > d > a
            ("q", "x", "y", 3.0),
            ("q", "y", "z", 1.0),
            ("q", "z", "w", 2.0),
        ]
    )
    result = transitive_pairs(rows, decay=0.5, max_hops=3)
    # p's four responses form one cycle: reported, nothing derived from it
    assert len(result.cycles) == 1
    assert result.cycles[0]["rows"] == [1, 2, 3, 4]
    assert sorted(result.cycles[0]["responses"]) == ["a", "b", "c", "d"]
    derived = [(r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in result.rows[7:]]
    assert derived == [
        ("q", "x", "z", 0.5),  # min(3, 1) * 0.5
        ("q", "x", "w", 0.25),  # min(3, 1, 2) * 0.25
        ("q", "y", "w", 0.5),  # min(1, 2) * 0.5
    ]
    assert result.added == 3
    # never the reverse of an input judgement
    inputs = {(r.raw["prompt"], r.raw["chosen"], r.raw["rejected"]) for r in rows}
    assert not any((p, b, a) in inputs for p, a, b, _ in derived)


def test_transitivity_skips_pairs_already_judged() -> None:
    rows = _rows([("p", "a", "b", 1.0), ("p", "b", "c", 1.0), ("p", "c", "a", 1.0)])
    result = transitive_pairs(rows)
    assert result.added == 0 and len(result.cycles) == 1
    rows = _rows([("p", "a", "b", 1.0), ("p", "b", "c", 1.0), ("p", "a", "c", 0.1)])
    assert transitive_pairs(rows).added == 0


def test_augment_cli_reports_cycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "pairs.jsonl"
    pairs = [("a", "b"), ("b", "c"), ("u", "v"), ("v", "u2"), ("u2", "u")]
    src.write_text(
        "".join(json.dumps({"prompt": "p", "chosen": a, "rejected": b}) + "\n" for a, b in pairs)
    )
    out = tmp_path / "aug.jsonl"
    with pytest.raises(SystemExit) as info:
        main(["data", "augment", str(src), str(out), "--transitivity"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "cycle (not propagated), rows [3, 4, 5]" in text
    assert "6 rows (5 input, 1 derived); 1 cycle(s)" in text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[-1] == {
        "prompt": "p",
        "chosen": "a",
        "rejected": "c",
        "margin": 0.5,
        "source": "transitivity",
    }
    assert all(r["margin"] == 1.0 for r in rows[:-1])


def test_split_by_prompt_is_disjoint_seeded_and_stratified() -> None:
    rows = [
        {
            "prompt": f"p{i}",
            "chosen": "a",
            "rejected": f"b{j}",
            "category": "safe" if i < 40 else "x",
        }
        for i in range(60)
        for j in range(2)
    ]
    parts = split_by_prompt(rows, validation=0.25, test=0.25, seed=3)
    prompts = {name: {r["prompt"] for r in part} for name, part in parts.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    assert sum(len(p) for p in parts.values()) == len(rows)
    # stratified: 40 "safe" prompts -> 20/10/10, 20 "x" prompts -> 10/5/5
    for name, (safe, other) in {"train": (20, 10), "validation": (10, 5), "test": (10, 5)}.items():
        categories = [r["category"] for r in parts[name] if r["rejected"] == "b0"]
        assert (categories.count("safe"), categories.count("x")) == (safe, other)
    assert split_by_prompt(rows, validation=0.25, test=0.25, seed=3) == parts
    assert split_by_prompt(rows, validation=0.25, test=0.25, seed=4) != parts


def test_split_cli_writes_three_files(tmp_path: Path) -> None:
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(10)))
    with pytest.raises(SystemExit) as info:
        main(["data", "split", str(src), "--out-dir", str(tmp_path / "s"), "--seed", "1"])
    assert info.value.code == 0
    counts = [
        len((tmp_path / "s" / f"{n}.jsonl").read_text().splitlines())
        for n in ("train", "validation", "test")
    ]
    assert counts == [8, 1, 1]
