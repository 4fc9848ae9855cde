"""User and library text reaches the terminal as written: square brackets are not taken for
rich markup (``[tensorboard]``, a list of files, ``run_name=[exp]1``)."""

from __future__ import annotations

from pathlib import Path

import pytest

import alignkit.tracking.sinks as sinks
from alignkit.cli import main
from alignkit.data.synthetic import write_task

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rows = write_task(folder)["sft_train"].read_text(encoding="utf-8").splitlines(True)
    small = folder / "small.jsonl"
    small.write_text("".join(rows[:8]), encoding="utf-8")
    return small


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return 0 if exit_info.value.code is None else int(exit_info.value.code)


def sft(tmp_path: Path, data: Path, *overrides: str) -> list[str]:
    return [
        "train", "sft", "-c", str(EXAMPLES / "sft.yaml"), f"output_dir={tmp_path}",
        f"data.train_file={data}", "data.eval_file=null", "eval.every=null", "max_steps=1",
        "logging.progress_bar=false", "logging.plots=false", *overrides,
    ]  # fmt: skip


def test_bracketed_file_names_are_named_in_the_error(tmp_path, capsys):
    assert run(*sft(tmp_path, Path("x"), "data.train_file=runs[exp]/a.jsonl")) == 2
    assert "error: runs[exp]/a.jsonl: no such file" in capsys.readouterr().err
    # A list of train files (mixed by data.train_weights): the missing one is named.
    assert run(*sft(tmp_path, Path("x"), "data.train_file=['[x]a.jsonl', b.jsonl]")) == 2
    assert "error: [x]a.jsonl: no such file" in capsys.readouterr().err


def test_the_install_hint_keeps_its_extra(tmp_path, sft_rows, capsys, monkeypatch):
    monkeypatch.setattr(sinks.importlib.util, "find_spec", lambda name: None)
    assert run(*sft(tmp_path, sft_rows, "logging.report_to=[tensorboard]")) == 2
    assert "pip install 'alignkit[tensorboard]'" in capsys.readouterr().err


def test_a_bracketed_run_name_is_printed_as_given(tmp_path, sft_rows, capsys):
    run(*sft(tmp_path, sft_rows, "run_name=[exp]1"))
    assert f"run directory: {tmp_path / '[exp]1'}" in capsys.readouterr().out
