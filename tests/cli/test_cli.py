"""The command line: help, version, ops-check, and how user errors are reported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.cli.ops_check import run_checks
from alignkit.data.synthetic import SyntheticTask


def test_help_lists_ops_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "ops-check" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("alignkit ")


@pytest.mark.parametrize("seed", [0, 1])
def test_every_ops_identity_holds(seed: int) -> None:
    results = run_checks(seed)
    assert len(results) >= 10
    failed = [r for r in results if not r.ok]
    assert not failed, failed


def test_ops_check_command_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["ops-check"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "formula" in out and "FAIL" not in out
    assert "E_pi[k1]" in out and "E_pi[k3]" in out  # formulas are not eaten as rich markup


def test_check_result_fails_outside_tolerance() -> None:
    from alignkit.cli.ops_check import CheckResult

    assert CheckResult("x", 1.0, 1.0, 0.0).ok
    assert not CheckResult("x", 1.1, 1.0, 0.05).ok
    assert not CheckResult("x", float("nan"), 1.0, 1.0).ok


def test_data_synthetic_writes_the_files_the_examples_read(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "synthetic", "--out", str(tmp_path / "data"), "--seed", "3"])
    assert exit_info.value.code in (0, None)
    assert "wrote 25 files" in capsys.readouterr().out  # 16 assistant-task + 9 verifiable
    examples = Path(__file__).parents[2] / "examples"
    for config in examples.glob("*.yaml"):
        for name in re.findall(r"data/(\w+\.jsonl)", config.read_text()):
            assert (tmp_path / "data" / name).is_file(), (config.name, name)
    written = (tmp_path / "data" / "preference_train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == SyntheticTask(3).preference_rows("train")
