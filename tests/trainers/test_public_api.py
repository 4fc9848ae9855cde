"""The top-level API: every exported name resolves, lazily (``import alignkit`` stays light)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import alignkit
from alignkit.errors import DataError


def test_every_exported_name_resolves():
    for name in alignkit.__all__:
        assert getattr(alignkit, name) is not None, name
    assert alignkit.train_dpo.__module__ == "alignkit.trainers.dpo"
    assert alignkit.RewardScorer.__name__ == "ModelReward"
    # online RL from Python: one function per preset, TRL's argument names
    import inspect

    for name in ("train_grpo", "train_ppo", "train_rloo", "train_reinforce_pp", "train_reinforce"):
        assert name in alignkit.__all__ and getattr(alignkit, name).__name__ == name
        parameters = inspect.signature(getattr(alignkit, name)).parameters
        assert {"model", "reward_funcs", "train_dataset", "overrides"} <= set(parameters)
    assert "cost_funcs" in inspect.signature(alignkit.train_safe_ppo).parameters


def test_importing_alignkit_does_not_import_torch():
    code = "import sys, alignkit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_documented_python_use_runs(tmp_path, head_of, run_settings):
    cfg = alignkit.load_config(
        alignkit.SFTConfig,
        None,
        run_settings(tmp_path, "api", f"data.train_file={head_of('sft_train', 8)}", "max_steps=2"),
    )
    summary = alignkit.train_sft(cfg)
    model, tokenizer = alignkit.load_policy(summary["last_checkpoint"] + "/model")
    from_run, _ = alignkit.load_policy(summary["run_dir"])  # a run is its final model
    for mine, theirs in zip(model.parameters(), from_run.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    settings = alignkit.SamplingConfig(max_new_tokens=4, temperature=0.0)
    answers = alignkit.generate_responses(model, tokenizer, ["How do I bake bread?"], settings)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_a_datasets_dataset_is_accepted_where_a_file_is(
    tmp_path, head_of, run_settings, jsonl_rows
):
    import datasets
    import yaml

    rows = jsonl_rows(head_of("sft_train", 8))
    cfg = alignkit.load_config(
        alignkit.SFTConfig, None, run_settings(tmp_path, "ds", "max_steps=1")
    )
    cfg.data.train_file = datasets.Dataset.from_list(rows)
    summary = alignkit.train_sft(cfg)
    assert summary["step"] == 1
    written = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert written["data"]["train_file"] == "<in-memory Dataset of 8 rows>"
    bad = datasets.Dataset.from_list([{"prompt": "Q"}])
    with pytest.raises(DataError, match=r"<Dataset>:1: field 'completion'"):
        alignkit.load_records(bad, "sft")
