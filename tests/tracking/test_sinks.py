"""Metric sinks: JSONL flushing and resume truncation, console lines, optional sinks."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest
from rich.console import Console

from alignkit.errors import ConfigError
from alignkit.tracking import (
    ConsoleSink,
    JsonlSink,
    RunDir,
    open_sinks,
    read_metrics,
    truncate_metrics,
    write_summary,
)
from alignkit.tracking import sinks as sinks_module


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_writes_one_flushed_object_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"epoch": 0.5, "loss": 0.7, "rewards/chosen": 1.5})
    # Readable before close: a crash right now loses nothing already logged.
    assert lines(path) == [{"step": 1, "epoch": 0.5, "loss": 0.7, "rewards/chosen": 1.5}]
    sink.log(2, {"epoch": 1.0, "loss": 0.6})
    sink.close()
    assert [r["step"] for r in lines(path)] == [1, 2]


def test_resume_truncates_records_after_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(1, 8):
        sink.log(step, {"loss": 1.0 / step})
    sink.close()
    with path.open("a") as handle:
        handle.write('{"step": 8, "lo')  # torn by the crash
    resumed = JsonlSink(path, resume_step=4)
    resumed.log(5, {"loss": 0.2})
    resumed.close()
    assert [r["step"] for r in lines(path)] == [1, 2, 3, 4, 5]
    assert lines(path)[-1]["loss"] == 0.2


def test_truncate_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(Exception, match=r"metrics\.jsonl:2"):
        truncate_metrics(path, 2)


def test_new_run_starts_an_empty_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    JsonlSink(path).close()
    assert path.read_text() == ""


def test_read_metrics_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def console_sink(line_format=None, terminal=False, **kwargs):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=200)
    sink = ConsoleSink(100, progress_bar=False, line_format=line_format, console=console, **kwargs)
    return sink, buffer


def test_console_prints_the_trainers_line_format():
    template = (
        "Epoch {epoch_number} step {step} loss_H={loss_H:.4f} loss_S={loss_S:.4f} "
        "KL={KL:.4f} lambda={lambda:.4f} J_C={J_C:.4f} delta_S_mean={delta_S_mean:.4f}"
    )
    sink, buffer = console_sink(template)
    metrics = {
        "epoch": 0.1,
        "loss_H": 0.1234,
        "loss_S": 0.0567,
        "KL": 0.0123,
        "lambda": 0.9876,
        "J_C": -0.0234,
        "delta_S_mean": 0.1234,
    }
    sink.log(10, metrics)
    sink.log(11, {"epoch": 1.2, "eval/loss": 0.3})  # lacks the fields: no line
    sink.close()
    assert buffer.getvalue().splitlines() == [
        "Epoch 1 step 10 loss_H=0.1234 loss_S=0.0567 KL=0.0123 lambda=0.9876 J_C=-0.0234 "
        "delta_S_mean=0.1234"
    ]


def test_epoch_number_is_one_based_and_ends_with_its_epoch():
    sink, _ = console_sink("{epoch_number}")
    numbers = [sink.format_line(1, {"epoch": e}) for e in (0.25, 1.0, 1.01, 2.0)]
    assert numbers == ["1", "1", "2", "2"]


def test_metric_names_with_slashes_work_in_templates():
    sink, _ = console_sink("{rewards/margins:.2f}")
    assert sink.format_line(1, {"rewards/margins": 1.234}) == "1.23"


def test_without_a_format_a_log_file_gets_plain_lines_and_a_terminal_does_not():
    plain, buffer = console_sink(None, terminal=False, key_metrics=("loss",))
    plain.log(5, {"epoch": 0.5, "loss": 0.25, "lr": 1e-5, "eval/acc": 0.75})
    assert buffer.getvalue().strip() == "step 5/100 epoch 0.50 loss=0.25 eval/acc=0.75"
    fancy, buffer = console_sink(None, terminal=True)
    fancy.log(5, {"epoch": 0.5, "loss": 0.25})
    assert buffer.getvalue() == ""


@pytest.mark.parametrize("template", ["{loss", "{}", "{0}"])
def test_bad_templates_are_config_errors(template):
    with pytest.raises(ConfigError, match="console_format"):
        console_sink(template)


def test_progress_bar_shows_key_metrics_and_finishes():
    buffer = io.StringIO()
    sink = ConsoleSink(
        4, console=Console(file=buffer, force_terminal=True, width=120), key_metrics=("loss",)
    )
    for step in range(1, 5):
        sink.advance(step)
    sink.log(4, {"epoch": 1.0, "loss": 0.125})
    sink.close()
    assert "4/4" in buffer.getvalue()
    assert "loss=0.125" in buffer.getvalue()


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_asking_for_a_missing_optional_sink_is_a_config_error(tmp_path, monkeypatch, sink):
    real_find_spec = sinks_module.importlib.util.find_spec
    monkeypatch.setattr(
        sinks_module.importlib.util,
        "find_spec",
        lambda name: None if name == sink else real_find_spec(name),
    )
    with pytest.raises(ConfigError, match=rf"'{sink}'.*not installed.*alignkit\[{sink}\]"):
        open_sinks(RunDir(tmp_path), ["jsonl", sink])
    assert not (tmp_path / "metrics.jsonl").exists()  # checked before writing anything


def test_unknown_sink_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="mlflow"):
        open_sinks(RunDir(tmp_path), ["mlflow"])


def test_tensorboard_sink_writes_scalars_and_purges_after_resume(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, name, value, global_step):
            calls.append(("scalar", name, value, global_step))

        def flush(self):
            calls.append(("flush",))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(sinks_module.importlib.util, "find_spec", lambda name: object())
    run = RunDir(tmp_path)
    sinks = open_sinks(run, ["tensorboard"], resume_step=7)
    for sink in sinks:
        sink.log(8, {"loss": 0.5})
        sink.close()
    assert calls[0] == ("init", str(run.tensorboard_dir), 8)
    assert ("scalar", "loss", 0.5, 8) in calls and calls[-1] == ("close",)


def test_wandb_sink_resumes_the_same_run(tmp_path, monkeypatch):
    runs = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, metrics, step):
            self.logged.append((step, metrics))

        def finish(self):
            self.finished = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: FakeRun(**kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(sinks_module.importlib.util, "find_spec", lambda name: object())
    run = RunDir(tmp_path)
    for _ in range(2):
        (jsonl, wandb_sink) = open_sinks(run, ["wandb"], run_name="demo", config={"seed": 1})
        wandb_sink.log(3, {"loss": 0.5})
        wandb_sink.close()
        jsonl.close()
    assert runs[0].kwargs["id"] == runs[1].kwargs["id"]
    assert runs[0].kwargs["resume"] == "allow" and runs[0].kwargs["config"] == {"seed": 1}
    assert runs[0].logged == [(3, {"loss": 0.5})] and runs[0].finished


def test_write_summary_converts_tensors(tmp_path):
    import torch

    path = write_summary(tmp_path, {"loss": torch.tensor(0.5), "steps": 3, "eval": {"a": 1.0}})
    assert json.loads(path.read_text()) == {"loss": 0.5, "steps": 3, "eval": {"a": 1.0}}
