"""Reward entries with options from a YAML config: resolved, checked, written back."""

from __future__ import annotations

import pytest

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.rollout.rewards import build_reward_source
from alignkit.trainers.pg import PGConfig
from alignkit.trainers.rl_config import RewardSourceConfig


def _config(tmp_path, rewards: str) -> PGConfig:
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{name: tiny}}\ndata: {{train_file: p.jsonl}}\nrewards:\n{rewards}")
    return load_config(PGConfig, path)


def test_options_reach_the_reward_class(tmp_path) -> None:
    cfg = _config(
        tmp_path,
        "  - {function: math_accuracy, options: {format: boxed}}\n"
        "  - {function: 'reasoning_gym:chain_sum', weight: 0.5}\n",
    )
    specs = [s.spec() for s in cfg.rewards]
    assert specs == [
        {"function": "math_accuracy", "weight": 1.0, "options": {"format": "boxed"}},
        {"function": "reasoning_gym:chain_sum", "weight": 0.5},
    ]
    source = build_reward_source(specs)
    assert source.sources[0][0].fn.format == "boxed"
    assert source.sources[1][0].fn.task == "chain_sum"


def test_options_on_a_model_entry_or_a_plain_function_are_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'options' belong to a 'function' entry"):
        _config(tmp_path, "  - {model: runs/rm, options: {a: 1}}\n")
    with pytest.raises(ConfigError, match="'options' is a mapping, for a 'function' entry only"):
        build_reward_source([{"model": "runs/rm", "options": {"a": 1}}])
    cfg = _config(tmp_path, "  - {function: exact_match, options: {a: 1}}\n")
    with pytest.raises(ConfigError, match="is a function: it takes no options"):
        build_reward_source([s.spec() for s in cfg.rewards])
    assert RewardSourceConfig(function="x").spec() == {"function": "x", "weight": 1.0}


def test_unknown_names_list_the_families(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'math_accuracy'.*reasoning_gym:<name>"):
        build_reward_source([{"function": "math_acuracy"}])
