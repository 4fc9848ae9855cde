"""How to write a reward function is where a user looks: the README's section (its example
runs as written, in a GRPO run) and the end of `alignkit train grpo --help`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.synthetic import write_verifiable_tasks

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Writing a reward function", 1)[1].split("\n### ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def help_text(capsys, method: str) -> str:
    with pytest.raises(SystemExit):
        main(["train", method, "--help"])
    return capsys.readouterr().out


def test_train_grpo_help_says_how_to_write_a_reward_function(capsys):
    text = help_text(capsys, "grpo")
    assert "Writing a reward function" in text
    assert "def fn(prompts, completions, answer, **kwargs)" in text
    assert "None where the function does not apply" in text
    assert "my_reward.py:fn" in text and "{model: runs/rm}" in text
    assert "Writing a reward function" not in help_text(capsys, "sft")


def test_the_readme_example_scores_both_prompt_styles():
    namespace: dict = {}
    exec(readme_example(), namespace)
    fn = namespace["exact_answer"]
    assert fn(["sort 31:"] * 2, ["13", "31"], answer=["13", "13"]) == [1.0, 0.0]
    messages = [[{"role": "assistant", "content": "13"}], [{"role": "assistant", "content": "x"}]]
    assert fn(["p", "p"], messages, answer=["13", None], extra=[1, 2]) == [1.0, None]


def test_the_readme_example_trains_grpo_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_reward.py").write_text(readme_example(), encoding="utf-8")
    data = write_verifiable_tasks(tmp_path / "data")
    prompts = next(p for p in data.values() if p.name == "sort_prompts.jsonl")
    args = [
        "train",
        "grpo",
        "model.name=tiny",
        f"data.train_file={prompts}",
        "rewards=[{function: my_reward.py:exact_answer, weight: 1.0}]",
        "rollout.prompts_per_iteration=2",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=4",
        "train.sequences_per_device=4",
        "train.iterations=1",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
        f"output_dir={tmp_path / 'runs'}",
        "run_name=readme-reward",
    ]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None)
    record = json.loads((tmp_path / "runs" / "readme-reward" / "metrics.jsonl").read_text())
    assert 0.0 <= record["reward/mean"] <= 1.0  # scored by the README function, not NaN
