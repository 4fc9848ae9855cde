"""The command line: help, version, ops-check, and how user errors are reported."""

from __future__ import annotations

import pytest

from alignkit.cli import main
from alignkit.cli.ops_check import run_checks


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
