"""reasoning_gym:<task>: rows generated offline and deterministic, scored by the task's own
scorer after a JSONL round trip, reachable by name from a config and from the CLI."""

from __future__ import annotations

import json

import pytest
import reasoning_gym

from alignkit.cli import main
from alignkit.errors import ConfigError
from alignkit.rollout import load_prompt_file
from alignkit.rollout.rewards import RewardFunctionError, build_reward_source
from alignkit.rollout.verifiers.reasoning_tasks import reasoning_gym_rows, score_answer


def _round_trip(rows):
    return json.loads(json.dumps(rows))


def test_rows_are_the_tasks_own_entries_and_deterministic() -> None:
    rows = reasoning_gym_rows("chain_sum", 4, seed=7, min_terms=2, max_terms=2)
    entries = list(
        reasoning_gym.create_dataset("chain_sum", size=4, seed=7, min_terms=2, max_terms=2)
    )
    assert [r["prompt"][-1]["content"] for r in rows] == [e["question"] for e in entries]
    assert [r["answer"] for r in rows] == [e["answer"] for e in entries]
    assert rows[0]["task_config"] == {"min_terms": 2, "max_terms": 2, "seed": 7, "size": 4}
    assert rows == reasoning_gym_rows("chain_sum", 4, seed=7, min_terms=2, max_terms=2)
    assert rows != reasoning_gym_rows("chain_sum", 4, seed=8, min_terms=2, max_terms=2)


def test_prompt_styles() -> None:
    chat = reasoning_gym_rows("basic_arithmetic", 1, 0, system="default", instruction="Be brief.")
    assert (
        chat[0]["prompt"][0]["role"] == "system" and "<answer>" in chat[0]["prompt"][0]["content"]
    )
    assert chat[0]["prompt"][1]["content"].endswith("\nBe brief.")
    text = reasoning_gym_rows("basic_arithmetic", 1, 0, system="Solve it.", chat=False)
    assert isinstance(text[0]["prompt"], str) and text[0]["prompt"].startswith("Solve it.\n\n")


@pytest.mark.parametrize("task", ["arc_1d", "rearc", "basic_arithmetic", "rubiks_cube"])
def test_after_a_jsonl_round_trip_the_oracle_scores_like_the_native_entry(task) -> None:
    rows = _round_trip(reasoning_gym_rows(task, 2, seed=3))
    dataset = reasoning_gym.create_dataset(task, size=2, seed=3)
    for row, entry in zip(rows, dataset, strict=True):
        native = dataset.score_answer(entry["answer"], entry)
        assert score_answer(task, row["answer"], row) == native
    if task == "rearc":  # its scorer compares tuples: the JSON metadata alone would score 0.05
        entry = {"answer": rows[0]["answer"], "metadata": rows[0]["metadata"]}
        assert dataset.score_answer(rows[0]["answer"], entry) < 1.0


def test_the_reward_by_name_extracts_the_answer_and_checks_the_rows() -> None:
    rows = _round_trip(reasoning_gym_rows("basic_arithmetic", 3, seed=1))
    answers = [r["answer"] for r in rows]
    fields = [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    completions = [f"<think>hm</think><answer>{answers[0]}</answer>", f" {answers[1]} ", "no idea"]
    source = build_reward_source([{"function": "reasoning_gym:basic_arithmetic"}])
    assert source(["p"] * 3, completions, fields).tolist() == [1.0, 1.0, 0.0]
    tags_only = build_reward_source(
        [{"function": "reasoning_gym:basic_arithmetic", "options": {"extract": "answer_tags"}}]
    )
    assert tags_only(["p"] * 3, completions, fields).tolist() == [1.0, 0.0, 0.0]
    other = build_reward_source([{"function": "reasoning_gym:chain_sum"}])
    with pytest.raises(RewardFunctionError, match="sample 0 is a 'basic_arithmetic' row"):
        other(["p"], ["1"], fields[:1])
    tampered = [{**fields[0], "answer": "123456789"}]
    with pytest.raises(RewardFunctionError, match="another reasoning-gym version"):
        source(["p"], ["1"], tampered)


def test_rows_from_elsewhere_are_scored_with_their_own_answer() -> None:
    source = build_reward_source([{"function": "reasoning_gym:basic_arithmetic"}])
    assert source(["p", "q"], ["-4", "5"], [{"answer": "-4"}, {"answer": "-4"}]).tolist() == [1, 0]


def test_bad_names_and_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no task 'chain_summ' \\(did you mean chain_sum"):
        build_reward_source([{"function": "reasoning_gym:chain_summ"}])
    with pytest.raises(ConfigError, match="accepted: extract, config"):
        build_reward_source([{"function": "reasoning_gym:chain_sum", "options": {"size": 3}}])
    with pytest.raises(ConfigError, match="bad config"):
        reasoning_gym_rows("chain_sum", 2, 0, max_term=2)


def test_cli_writes_a_prompt_file_the_trainer_reads(tmp_path, capsys) -> None:
    from alignkit.models import load_policy

    out = tmp_path / "chain.jsonl"
    args = ["data", "reasoning-gym", "chain_sum", "--size", "5", "--seed", "2", "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        main(
            [
                *args,
                "--set",
                "max_terms=2",
                "--set",
                "min_terms=2",
                "--instruction",
                "Just the number.",
            ]
        )
    assert done.value.code in (0, None)
    assert f"{out}: 5 chain_sum prompts" in capsys.readouterr().out
    _, tokenizer = load_policy("tiny")
    prompts = load_prompt_file(out, tokenizer)
    assert len(prompts) == 5 and set(prompts[0].fields) == {
        "answer",
        "metadata",
        "task",
        "task_config",
    }
    with pytest.raises(SystemExit) as done:
        main(
            [
                "data",
                "reasoning-gym",
                "chain_sum",
                "--size",
                "2",
                "--set",
                "max_terms",
                "--out",
                str(out),
            ]
        )
    assert done.value.code == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err
