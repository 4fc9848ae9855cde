"""Loaders and validation: every file kind, conversational rows, and every kind of bad row."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data import RecordSet, file_kind, load_records, validate_records
from alignkit.errors import AlignkitError, DataError

PAIR = {"prompt": "How do I cook pasta?", "chosen": "Boil water.", "rejected": "No."}


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problems_of(err: DataError) -> list[tuple[int, str]]:
    return [(p.row, p.field) for p in err.problems]


# --- file kinds ------------------------------------------------------------------------------


def test_every_file_kind_loads_the_same_records(tmp_path):
    rows = [dict(PAIR, margin=1.5), dict(PAIR, chosen="Drain it.", margin=0.5)]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    write_jsonl(tmp_path / "rows.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    header = "prompt,chosen,rejected,margin\n"
    body = "".join(f'"{r["prompt"]}",{r["chosen"]},{r["rejected"]},{r["margin"]}\n' for r in rows)
    (tmp_path / "rows.csv").write_text(header + body)
    (tmp_path / "rows.tsv").write_text(header.replace(",", "\t") + body.replace(",", "\t"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    names = ["list.json", "wrapped.json", "lines.json", "rows.jsonl", "rows.parquet", "rows.csv"]
    for name in [*names, "rows.tsv", "saved"]:
        records = load_records(tmp_path / name, "preference")
        assert isinstance(records, RecordSet)
        assert list(records) == rows, name
    assert file_kind(tmp_path / "saved") == "datasets"
    assert load_records(tmp_path / "rows.csv", "preference").rows == [2, 3]  # header is line 1
    assert load_records(tmp_path / "list.json", "preference").rows == [1, 2]


def test_dataset_dict_needs_a_split_when_it_has_several(tmp_path):
    splits = {"train": [dict(PAIR)], "test": [dict(PAIR, chosen="Other.")]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd", "preference", split="test")[0]["chosen"] == "Other."
    with pytest.raises(DataError, match="train, test"):
        load_records(tmp_path / "dd", "preference")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "no such file"),
        ("rows.xml", "<a/>", "unknown file type '.xml'"),
        ("empty.jsonl", "\n\n", "no records"),
        ("scalar.json", "42", "expected a list of objects"),
        ("broken.json", '[{"prompt": "a"', "invalid JSON at line 1"),
        ("bad.parquet", "not parquet", "cannot read Parquet"),
    ],
)
def test_file_level_problems_raise_data_error_with_exit_code_2(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_records(path, "prompt")
    assert isinstance(info.value, AlignkitError) and info.value.exit_code == 2
    assert info.value.problems[0].row == 0
    # A problem with the whole file reads as one line about the file, not as a bad row.
    assert str(info.value).startswith(f"{path}: ") and "invalid row" not in str(info.value)


def test_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        load_records(tmp_path, "prompt")


# --- conversational and normalised forms -----------------------------------------------------


def test_conversational_rows_normalise(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    reply = [{"role": "assistant", "content": "Hello."}]
    rows = [
        {"messages": [*chat, *reply]},
        {"prompt": chat, "completion": reply},
        {"prompt": "a", "completion": "b"},
    ]
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    records = load_records(sft, "sft")
    assert records[0] == {"prompt": chat, "completion": "Hello."}
    assert records[1] == records[0]
    assert records[2] == {"prompt": "a", "completion": "b"}
    pref = validate_records(
        [{"prompt": chat, "chosen": reply, "rejected": "Go away."}], "preference"
    )
    assert pref[0] == {"prompt": chat, "chosen": "Hello.", "rejected": "Go away."}
    prompts = validate_records([{"prompt": chat, "extra": 1}], "prompt")
    assert prompts[0] == {"prompt": chat}  # unknown fields are ignored
    pq.write_table(pa.Table.from_pylist([{"messages": [*chat, *reply]}]), tmp_path / "m.parquet")
    datasets.Dataset.from_list([{"messages": [*chat, *reply]}]).save_to_disk(str(tmp_path / "m"))
    for name in ["m.parquet", "m"]:
        assert list(load_records(tmp_path / name, "sft")) == [records[0]], name


def pku(better: int, safer: int, safe0: bool, safe1: bool) -> dict:
    return {
        "prompt": "p",
        "response_0": "r0",
        "response_1": "r1",
        "better_response_id": better,
        "safer_response_id": safer,
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
    }


def test_pku_rows_normalise_to_helpfulness_order_with_signed_safety_scores():
    records = validate_records(
        [pku(1, 0, True, False), pku(0, 0, True, True), pku(0, 1, False, False)],
        "safety_preference",
    )
    conflict, both_safe, both_unsafe = records
    assert (conflict["chosen"], conflict["rejected"]) == ("r1", "r0")
    assert (conflict["chosen_is_safe"], conflict["rejected_is_safe"]) == (False, True)
    assert conflict["chosen_safety"] - conflict["rejected_safety"] == -3.0  # delta_S < 0
    assert (both_safe["chosen_safety"], both_safe["rejected_safety"]) == (1.5, 0.5)
    assert (both_unsafe["chosen_safety"], both_unsafe["rejected_safety"]) == (-1.5, -0.5)
    for r in records:  # the sign of the score is the safe label
        assert (r["chosen_safety"] > 0) == r["chosen_is_safe"]


def test_flattened_safety_rows_accept_numbers_and_booleans(tmp_path):
    rows = [
        dict(PAIR, chosen_safety=-0.7, rejected_safety=0.2),
        dict(PAIR, chosen_safety=True, rejected_safety=False),
    ]
    records = validate_records(rows, "safety_preference")
    assert records[0]["chosen_is_safe"] is False and records[0]["rejected_is_safe"] is True
    assert (records[1]["chosen_safety"], records[1]["rejected_safety"]) == (1.0, -1.0)
    csv = tmp_path / "safety.csv"
    csv.write_text(
        "prompt,response_0,response_1,better_response_id,safer_response_id,"
        "is_response_0_safe,is_response_1_safe\np,a,b,0,1,false,true\n"
    )
    [row] = load_records(csv, "safety_preference")
    assert row["chosen"] == "a" and row["chosen_is_safe"] is False


# --- bad rows --------------------------------------------------------------------------------


def test_jsonl_errors_name_every_bad_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            PAIR,  # line 1 fine
            "",  # line 2 blank: not a record, still a line
            '{"prompt": "x", "chosen": ',  # line 3 invalid JSON
            {"prompt": "x", "chosen": "y"},  # line 4 missing rejected
            {"prompt": 7, "chosen": "y", "rejected": ["no"]},  # line 5 two wrong types
            {"prompt": "  ", "chosen": "y", "rejected": "z"},  # line 6 empty string
            [1, 2],  # line 7 not an object
            dict(PAIR, margin="big"),  # line 8 margin not a number
            dict(PAIR, margin=float("nan")),  # line 9 margin not finite
        ],
    )
    with pytest.raises(DataError) as info:
        load_records(path, "preference")
    err = info.value
    assert err.exit_code == 2
    assert problems_of(err) == [
        (3, "<row>"),
        (4, "rejected"),
        (5, "prompt"),
        (5, "rejected[0]"),
        (6, "prompt"),
        (7, "<row>"),
        (8, "margin"),
        (9, "margin"),
    ]
    text = str(err)
    assert text.startswith("7 invalid row(s) (8 problems; format 'preference')")
    assert f"{path}:3: field '<row>': invalid JSON" in text
    assert "field 'rejected': missing field" in text
    assert "expected a string or a message list, got integer" in text
    assert "empty string" in text
    assert "expected an object, got list" in text
    assert "expected a number, got string" in text
    assert "expected a finite number" in text


def test_error_lists_up_to_the_limit_and_counts_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": ""}] * 30)
    with pytest.raises(DataError) as info:
        load_records(path, "prompt", max_problems=5)
    assert len(info.value.problems) == 5 and info.value.total == 30
    assert [p.row for p in info.value.problems] == [1, 2, 3, 4, 5]
    assert "... and 25 more problem(s)" in str(info.value)
    with pytest.raises(DataError) as default:
        load_records(path, "prompt")
    assert len(default.value.problems) == 20 and default.value.total == 30


def test_csv_errors_use_file_line_numbers(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(
        "prompt,response,rating\n"  # line 1
        'p,"a two-line\nanswer",4\n'  # lines 2-3: fine
        "p,b,high\n"  # line 4: rating not a number
        "\n"  # line 5 blank
        "p,,3\n"  # line 6: empty response
        "p,c,3,extra\n"  # line 7: too many cells
        "p,d\n"  # line 8: rating missing
    )
    with pytest.raises(DataError) as info:
        load_records(path, "rating")
    assert problems_of(info.value) == [(4, "rating"), (6, "response"), (7, "<row>"), (8, "rating")]
    assert "expected a number, got 'high'" in str(info.value)
    assert "4 cells but the header has 3 columns" in str(info.value)


def test_json_and_parquet_errors_use_record_numbers(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": None}, {"prompt": "c"}, {"prompt": ""}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ["rows.json", "rows.parquet"]:
        with pytest.raises(DataError) as info:
            load_records(tmp_path / name, "prompt")
        assert problems_of(info.value) == [(2, "prompt"), (4, "prompt")], name
        assert "got null" in str(info.value)


def test_message_list_errors_name_the_message_field():
    rows = [
        {"prompt": []},
        {"prompt": [{"role": "robot", "content": "hi"}]},
        {"prompt": [{"role": "user"}]},
        {"prompt": ["hi"]},
    ]
    with pytest.raises(DataError) as info:
        validate_records(rows, "prompt", source="mem")
    assert problems_of(info.value) == [
        (1, "prompt"),
        (2, "prompt[0].role"),
        (3, "prompt[0].content"),
        (4, "prompt[0]"),
    ]
    bad_sft = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": "hi"},
        {"prompt": "p", "completion": [{"role": "user", "content": "x"}]},
    ]
    with pytest.raises(DataError) as info:
        validate_records(bad_sft, "sft")
    assert problems_of(info.value) == [(1, "messages"), (2, "messages"), (3, "completion")]
    assert "the last one from the assistant" in str(info.value)


def test_pku_errors_report_bad_ids_labels_and_contradictions():
    missing = pku(0, 0, True, True)
    del missing["is_response_1_safe"]
    rows = [
        pku(2, 0, True, True),
        dict(pku(0, 0, True, True), safer_response_id=True),
        dict(pku(0, 0, True, True), is_response_0_safe="yes"),
        missing,
        pku(0, 1, True, False),  # the safer one is marked unsafe, the other safe
        {"prompt": "p", "answer": "x"},  # neither format
    ]
    with pytest.raises(DataError) as info:
        validate_records(rows, "safety_preference")
    assert problems_of(info.value) == [
        (1, "better_response_id"),
        (2, "safer_response_id"),
        (3, "is_response_0_safe"),
        (4, "is_response_1_safe"),
        (5, "safer_response_id"),
        (6, "response_0"),
    ]
    text = str(info.value)
    assert "expected response id 0 or 1, got 2" in text
    assert "marked unsafe, while the other is safe" in text
    assert "flattened format" in text


def test_margin_must_be_given_for_every_pair_or_none():
    rows = [dict(PAIR, margin=1.0), dict(PAIR), dict(PAIR, margin=2.0), dict(PAIR)]
    with pytest.raises(DataError) as info:
        validate_records(rows, "preference")
    assert problems_of(info.value) == [(2, "margin"), (4, "margin")]
    assert len(validate_records([dict(PAIR), dict(PAIR)], "preference")) == 2


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown data format"):
        validate_records([PAIR], "pairs")


def test_record_set_sample_is_seeded_keeps_file_order_and_row_numbers() -> None:
    records = RecordSet([{"i": i} for i in range(20)], list(range(2, 22)), "f.jsonl", "sft")
    first, again, other = records.sample(5, seed=1), records.sample(5, seed=1), records.sample(5, 2)
    assert [r["i"] for r in first] == [r["i"] for r in again]
    assert [r["i"] for r in first] != [r["i"] for r in other]
    indices = [r["i"] for r in first]
    assert indices == sorted(indices) and len(set(indices)) == 5
    assert first.rows == [i + 2 for i in indices]  # each record keeps its line number
    assert records.sample(20, seed=0) is records and records.sample(99, seed=0) is records


# --- keep_fields ------------------------------------------------------------------------------


def test_keep_fields_keeps_other_columns_as_read(tmp_path):
    rows = [
        {"prompt": "Q1", "answer": "4", "level": 2},
        {"prompt": [{"role": "user", "content": "Q2"}], "answer": "5"},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert list(load_records(path, "prompt")) == [{"prompt": "Q1"}, {"prompt": rows[1]["prompt"]}]
    named = load_records(path, "prompt", keep_fields=["answer", "missing"])
    assert list(named) == [
        {"answer": "4", "prompt": "Q1"},
        {"answer": "5", "prompt": rows[1]["prompt"]},
    ]
    every = load_records(path, "prompt", keep_fields="all")
    assert every[0] == {"prompt": "Q1", "answer": "4", "level": 2} and every.rows == [1, 2]
    # A format's own fields keep their normalised value (the pair's prompt split from "chosen").
    implicit = {"chosen": "Q: A good answer.", "rejected": "Q: A bad one.", "score": 1}
    pair = load_records(
        write_jsonl(tmp_path / "pairs.jsonl", [implicit]), "preference", keep_fields="all"
    )
    assert pair[0]["chosen"] != implicit["chosen"] and pair[0]["score"] == 1
    # CSV cells are kept as the text they are; in-memory datasets keep columns too.
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,answer\nQ1,4\n")
    assert load_records(csv, "prompt", keep_fields=["answer"])[0] == {"answer": "4", "prompt": "Q1"}
    dataset = datasets.Dataset.from_list([{"prompt": "Q1", "answer": "4"}])
    assert load_records(dataset, "prompt", keep_fields="all")[0]["answer"] == "4"
    with pytest.raises(ValueError, match="a list of column names or 'all'"):
        load_records(path, "prompt", keep_fields="answer")
