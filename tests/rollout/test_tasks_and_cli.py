"""The verifiable tasks' files and verifiers, and `alignkit generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.synthetic import VERIFIABLE_TASKS, verifiable_rows, write_verifiable_tasks
from alignkit.models.tiny import load_tiny_tokenizer
from alignkit.rollout import load_prompt_file
from alignkit.rollout.rewards import build_reward_source


@pytest.mark.parametrize("task", sorted(VERIFIABLE_TASKS))
def test_task_rows_are_correct_disjoint_and_short(task: str) -> None:
    rows = verifiable_rows(task, seed=0)
    assert {k: len(v) for k, v in rows.items()} == {"sft": 300, "prompts": 1000, "heldout": 200}
    prompts = [r["prompt"] for split in rows.values() for r in split]
    assert len(set(prompts)) == len(prompts)  # no instance in two splits
    tokenizer = load_tiny_tokenizer()
    for row in rows["heldout"][:50]:
        operand = row["prompt"].split(" ", 1)[1].rstrip(":")
        expected = {
            "reverse": operand[::-1],
            "sort": "".join(sorted(operand)),
            "add": str(sum(int(x) for x in operand.split("+"))),
        }[task]
        assert row["answer"] == expected
        # one token per digit: the answer is at most 5 tokens
        assert len(tokenizer(row["answer"])["input_ids"]) == len(row["answer"]) <= 5
    # the task's reward scores the SFT completions (the right answers) 1.0 and a wrong one less
    sft = rows["sft"][:20]
    source = build_reward_source([{"function": VERIFIABLE_TASKS[task].reward}])
    prompts = [r["prompt"] for r in sft]
    answers = [{"answer": r["completion"]} for r in sft]
    assert source(prompts, [r["completion"] for r in sft], answers).tolist() == [1.0] * 20
    # one extra digit on the side the task does not align on: n of n + 1 positions right
    extra = [("9" + c if task == "add" else c + "9") for c in (r["completion"] for r in sft)]
    wrong = source(prompts, extra, answers)
    assert bool((wrong < 1.0).all()) and bool((wrong > 0.5).all())


def test_files_are_deterministic_and_keep_the_answer_column(tmp_path: Path) -> None:
    first = write_verifiable_tasks(tmp_path / "a", seed=1)
    again = write_verifiable_tasks(tmp_path / "b", seed=1)
    assert sorted(first) == sorted(
        f"{t}_{s}" for t in VERIFIABLE_TASKS for s in ("sft", "prompts", "heldout")
    )
    assert all(first[k].read_bytes() == again[k].read_bytes() for k in first)
    prompts = load_prompt_file(first["reverse_heldout"], load_tiny_tokenizer())
    row = json.loads(first["reverse_heldout"].read_text().splitlines()[0])
    assert prompts[0].text == row["prompt"] and prompts[0].fields == {"answer": row["answer"]}


def test_generate_cli_writes_n_samples_per_prompt_with_logprobs(tmp_path: Path, capsys) -> None:
    paths = write_verifiable_tasks(tmp_path, seed=0)
    small = tmp_path / "few.jsonl"
    small.write_text("".join(paths["sort_heldout"].read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "samples.jsonl"
    args = ["generate", "tiny", str(small), "--out", str(out), "-n", "4", "--logprobs"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--max-new-tokens", "5", "--seed", "3"])
    assert exit_info.value.code in (0, None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and [r["sample"] for r in rows[:4]] == [0, 1, 2, 3]
    assert all(
        "answer" in r and r["num_tokens"] == len(r["token_ids"]) == len(r["logprobs"]) for r in rows
    )
    assert all(
        r["logprob"] == pytest.approx(sum(r["logprobs"]), abs=1e-4) and r["logprob"] < 0
        for r in rows
    )
    tokenizer = load_tiny_tokenizer()
    assert rows[0]["completion"] == tokenizer.decode(rows[0]["token_ids"], skip_special_tokens=True)
    first = out.read_text()
    with pytest.raises(SystemExit):
        main([*args, "--max-new-tokens", "5", "--seed", "3"])
    assert out.read_text() == first  # the generator seed decides the samples
    assert "wrote 12 rows" in capsys.readouterr().out


def test_generate_cli_bad_settings_exit_2(tmp_path: Path, capsys) -> None:
    paths = write_verifiable_tasks(tmp_path, seed=0)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "generate",
                "tiny",
                str(paths["add_heldout"]),
                "--out",
                str(tmp_path / "x.jsonl"),
                "--top-p",
                "0",
            ]
        )
    assert exit_info.value.code == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
