"""A TRL user's port: the migration doc's GRPO and DPO blocks run as written, a TRL-style reward
function (``completion[0]["content"]``) trains unchanged on conversational prompts, TRL's
multi-task None pattern trains, and online RL runs from Python objects (``alignkit.train_grpo``).

One conversational SFT warm-up of the tiny model on the digit-sorting task per session (about
10 s), written as ``runs/sft`` of a working directory that also holds the prompt and pair files
the doc's blocks read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from online_helpers import SORT_SFT_RECIPE  # the sorting task's SFT warm-up

import alignkit
from alignkit.config import load_config
from alignkit.data.synthetic import write_task, write_verifiable_tasks
from alignkit.errors import ConfigError
from alignkit.rollout.tasks import position_match
from alignkit.tracking import read_metrics
from alignkit.trainers.sft import SFTConfig, train_sft

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating-from-trl.md"
QUIET = {"logging.progress_bar": False, "logging.plots": False}


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """``runs/sft`` (the tiny model taught to sort on conversational rows), ``chat_prompts.jsonl``
    (conversational prompts with their ``answer``) and ``pairs.jsonl`` (16 preference pairs)."""
    root = tmp_path_factory.mktemp("port")
    paths = write_verifiable_tasks(root / "data")
    sft_rows = [json.loads(line) for line in paths["sort_sft"].read_text().splitlines()]
    chat_sft = root / "chat_sft.jsonl"
    chat_sft.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        *_chat(r["prompt"]),
                        {"role": "assistant", "content": r["completion"]},
                    ]
                }
            )
            + "\n"
            for r in sft_rows
        )
    )
    prompts = [json.loads(line) for line in paths["sort_prompts"].read_text().splitlines()]
    (root / "chat_prompts.jsonl").write_text(
        "".join(
            json.dumps({"prompt": _chat(r["prompt"]), "answer": r["answer"]}) + "\n"
            for r in prompts
        )
    )
    pairs = write_task(root / "task")["preference_train"].read_text().splitlines()[:16]
    (root / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"output_dir={root / 'runs'}",
            "run_name=sft",
            "model.name=tiny",
            f"data.train_file={chat_sft}",
            "data.max_length=48",
            *SORT_SFT_RECIPE,
        ],
    )
    train_sft(cfg)
    return root


def _doc_block(name: str) -> str:
    """The Python block after ``<!-- port:<name> -->`` in the migration doc."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- port:{name} -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, f"docs/migrating-from-trl.md has no port:{name} block"
    return match.group(1)


@pytest.fixture
def in_workdir(workdir, monkeypatch, tmp_path):
    import datasets

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    return workdir


def test_the_docs_grpo_port_trains_a_trl_reward_function_on_conversational_prompts(in_workdir):
    namespace: dict = {}
    exec(compile(_doc_block("grpo"), "migrating-from-trl.md:port:grpo", "exec"), namespace)
    summary = namespace["summary"]
    assert summary["step"] == 20 and summary["stop_reason"] == "iterations"
    records = [r for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if r["step"]]
    accuracy = [r["reward/accuracy/mean"] for r in records]
    assert [r["reward/mean"] for r in records] == pytest.approx(accuracy)  # one function
    # it trains on the function's signal: groups with different rewards, nonzero updates
    assert min(r["reward/zero_std_frac"] for r in records) < 1 and 0 < max(accuracy) < 1
    assert all(r["grad_norm"] > 0 for r in records)
    samples = [
        json.loads(line)
        for line in (Path(summary["run_dir"]) / "samples" / "iteration-000001.jsonl").open()
    ]
    answers = {
        json.dumps(json.loads(line)["prompt"]): json.loads(line)["answer"]
        for line in Path("chat_prompts.jsonl").read_text().splitlines()
    }
    assert len(samples) == 64
    for row in samples:  # the function scored the completion's text, as TRL would
        prompt = row["prompt"].split("<|user|>\n", 1)[1].split("\n", 1)[0]
        answer = answers[json.dumps(_chat(prompt))]
        assert row["reward"] == float(row["completion"].strip() == answer)


def test_the_docs_dpo_port_runs_from_the_sft_run_directory(in_workdir, caplog, monkeypatch):
    import alignkit.models.loading

    monkeypatch.setattr(alignkit.models.loading, "_SAID", set())  # said once per process
    namespace: dict = {}
    exec(compile(_doc_block("dpo"), "migrating-from-trl.md:port:dpo", "exec"), namespace)
    summary = namespace["summary"]
    assert summary["step"] == 2  # 16 pairs, 8 per step, one epoch
    records = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    assert "rewards/accuracies" in records[-1]
    assert any("runs/sft: using its final checkpoint" in r.getMessage() for r in caplog.records)


def test_trls_multi_task_none_pattern_trains(in_workdir):
    """Two functions, each scoring the rows of its task (None on the others): every sample is
    scored by one of them, so every group has a signal (one None used to unscore them all)."""

    def even_rows(prompts, completions, answer, **kwargs):
        return [
            float(c[0]["content"].strip() == a) if int(a[0]) % 2 == 0 else None
            for c, a in zip(completions, answer, strict=True)
        ]

    def odd_rows(prompts, completions, answer, **kwargs):
        return [
            position_match(c[0]["content"], a) if int(a[0]) % 2 else None
            for c, a in zip(completions, answer, strict=True)
        ]

    summary = alignkit.train_grpo(
        model="runs/sft",
        reward_funcs=[even_rows, odd_rows],
        train_dataset="chat_prompts.jsonl",
        overrides={
            **QUIET,
            "output_dir": str(in_workdir / "runs"),
            "run_name": "multitask",
            "train.iterations": 3,
            "rollout.prompts_per_iteration": 16,
            "rollout.max_new_tokens": 8,
            "optim.lr": 1e-3,
            "logging.every": 1,
        },
    )
    records = [r for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if r["step"]]
    for record in records:
        assert record["reward/mean"] > 0  # 0 (and every advantage 0) before
        assert record["reward/zero_std_frac"] < 1
        assert record["reward/even_rows/mean"] is not None  # each scored its own rows
        assert record["reward/odd_rows/mean"] is not None


def test_online_rl_from_python_objects(in_workdir):
    """A config object, a loaded model with its tokenizer, a list of rows, a callable."""
    model, tokenizer = alignkit.load_policy("runs/sft")
    rows = [json.loads(line) for line in Path("chat_prompts.jsonl").read_text().splitlines()]
    seen = {}

    def exact(prompts, completions, answer, completion_ids, trainer_state, log_extra, log_metric):
        seen.update(step=trainer_state.global_step, ids=completion_ids[0], prompt=prompts[0])
        texts = [c[0]["content"].strip() for c in completions]
        log_extra("text", texts)
        log_metric("answered", sum(bool(t) for t in texts) / len(texts))
        return [float(t == a) for t, a in zip(texts, answer, strict=True)]

    cfg = load_config(
        alignkit.PGConfig,
        None,
        [
            f"output_dir={in_workdir / 'runs'}",
            "run_name=objects",
            "train.iterations=2",
            "rollout.prompts_per_iteration=4",
            "rollout.max_new_tokens=6",
            "logging.progress_bar=false",
            "logging.plots=false",
            "logging.every=1",
        ],
    )
    summary = alignkit.train_grpo(
        cfg, model=model, tokenizer=tokenizer, reward_funcs=exact, train_dataset=rows[:16]
    )
    assert summary["step"] == 2
    assert seen["step"] == 1 and seen["prompt"][0]["role"] == "user" and seen["ids"]
    record = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")[-1]
    assert 0 <= record["answered"] <= 1 and "reward/exact/mean" in record
    sample = json.loads(
        (Path(summary["run_dir"]) / "samples" / "iteration-000001.jsonl").open().readline()
    )
    assert sample["text"] == sample["completion"].strip()  # log_extra's column
    written = (Path(summary["run_dir"]) / "config.yaml").read_text()
    assert "exact>" in written  # the callable, recorded by name
    assert cfg.rewards == [] and cfg.data.train_file == ""  # the caller's config is untouched


def test_python_api_mistakes_are_config_errors(in_workdir):
    with pytest.raises(ConfigError, match=r"advantage\.estimator='grpo', but ppo means"):
        alignkit.train_ppo(load_config(alignkit.PGConfig, None, []), reward_funcs="sort_match")
    with pytest.raises(ConfigError, match="cost_funcs is for train_safe_ppo"):
        alignkit.train_grpo(reward_funcs="sort_match", cost_funcs="assistant_safety_cost")
    with pytest.raises(ConfigError, match="tokenizer= goes with a model object"):
        alignkit.train_grpo(model="runs/sft", tokenizer=object(), reward_funcs="sort_match")
    with pytest.raises(ConfigError, match="the rows do not make one table"):
        alignkit.train_grpo(train_dataset=[{"prompt": "a", "x": 1}, {"prompt": "b", "x": "y"}])
