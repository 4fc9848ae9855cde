"""`alignkit train <method> --resume RUN` says what is wrong with RUN before loading anything."""

from __future__ import annotations

import pytest

from alignkit.cli import main
from alignkit.config import load_config, save_resolved_config
from alignkit.trainers.reward import RewardConfig
from alignkit.trainers.sft import SFTConfig


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return 0 if exit_info.value.code is None else int(exit_info.value.code)


def test_resume_of_a_missing_directory_says_so(tmp_path, capsys):
    assert run("train", "sft", "--resume", str(tmp_path / "nothing")) == 2
    assert f"--resume {tmp_path / 'nothing'}: no such run directory" in capsys.readouterr().err


def test_resume_with_another_method_names_the_runs_method(tmp_path, capsys):
    save_resolved_config(load_config(SFTConfig, None, []), tmp_path / "sft" / "config.yaml")
    assert run("train", "dpo", "--resume", str(tmp_path / "sft")) == 2
    err = capsys.readouterr().err
    assert f"--resume {tmp_path / 'sft'}: that run was trained with `alignkit train sft`" in err
    assert "not dpo" in err


def test_resume_of_a_cost_model_run_as_rm_is_refused(tmp_path, capsys):
    cfg = load_config(RewardConfig, None, ["kind=cost"])
    save_resolved_config(cfg, tmp_path / "cost" / "config.yaml")
    assert run("train", "rm", "--resume", str(tmp_path / "cost")) == 2
    assert "trained with `alignkit train cost`, not rm" in capsys.readouterr().err
