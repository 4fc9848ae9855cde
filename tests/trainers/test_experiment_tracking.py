"""The TensorBoard and W&B sinks for real: a tiny run's metrics read back with each tool's reader.

tensorboard and wandb are in the ``dev`` extra (CI installs them), so these tests import them
outright: a missing package fails here instead of hiding behind a skip.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import wandb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from alignkit.config import load_config
from alignkit.tracking import RunDir, open_sinks, read_metrics
from alignkit.trainers.sft import SFTConfig, build_sft_trainer


def _tiny_sft_run(task_files, run_settings, output_dir: Path, report_to: str) -> Path:
    config = load_config(
        SFTConfig,
        None,
        run_settings(
            output_dir,
            "tracked",
            f"data.train_file={task_files['sft_train']}",
            "max_steps=3",
            "examples_per_device=8",
            "logging.every=1",
            f"logging.report_to=[{report_to}]",
        ),
    )
    build_sft_trainer(config).train()
    return output_dir / "tracked"


def _jsonl_series(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as ``{metric: {step: value}}``, the record the other sinks must match."""
    series: dict[str, dict[int, float]] = {}
    for record in read_metrics(run / "metrics.jsonl"):
        for name, value in record.items():
            if name != "step":
                series.setdefault(name, {})[record["step"]] = value
    return series


def _tensorboard_series(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir))  # purge_orphaned_data=True, as TensorBoard shows
    events.Reload()
    return {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }


def test_tensorboard_event_files_hold_the_runs_metrics(task_files, run_settings, tmp_path):
    run = _tiny_sft_run(task_files, run_settings, tmp_path, "tensorboard")
    expected = _jsonl_series(run)
    assert {"loss", "lr", "grad_norm", "epoch"} <= set(expected)
    assert set(expected["loss"]) == {1, 2, 3}
    board = _tensorboard_series(RunDir(run).tensorboard_dir)
    assert set(board) == set(expected)
    for tag, values in expected.items():
        assert set(board[tag]) == set(values), tag
        for step, value in values.items():  # event files store float32
            assert board[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


def test_tensorboard_resume_drops_the_events_after_the_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    for resume_step, steps, offset in ((None, range(1, 7), 0.0), (3, range(4, 6), 10.0)):
        sinks = open_sinks(run, ["tensorboard"], resume_step=resume_step)
        for step in steps:
            for sink in sinks:
                sink.log(step, {"loss": offset + step})
        for sink in sinks:
            sink.close()
    # Steps 4-6 of the first attempt are gone; 4-5 of the resumed attempt replace them.
    assert _tensorboard_series(run.tensorboard_dir) == {
        "loss": {1: 1.0, 2: 2.0, 3: 3.0, 4: 14.0, 5: 15.0}
    }


def _read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Records of a ``.wandb`` transaction log (what ``wandb sync`` uploads).

    The format of wandb's datastore: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
    LevelDB's log format: 32 KiB blocks of chunks ``crc32 (4) | length (2) | type (1) | data``
    (type 1 = a whole record, 2/3/4 = its first/middle/last piece; a block tail shorter than a
    chunk header is zero padding); the CRC is zlib's crc32 of the data seeded with that of the
    type byte. Each record is a protobuf ``wandb.proto.wandb_internal_pb2.Record``.
    """
    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), f"not a .wandb log: {path}"
    block, position, pieces, records = 32768, 7, [], []
    while position + 7 <= len(data):
        left_in_block = block - position % block
        checksum, length, kind = struct.unpack_from("<IHB", data, position)
        if left_in_block < 7 or (kind == 0 and length == 0):
            position += left_in_block
            continue
        chunk = data[position + 7 : position + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"bad chunk at {position}"
        position += 7 + length
        pieces.append(chunk)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    assert not pieces, "the log ends inside a record"
    return records


def _history_series(records: list[wandb_internal_pb2.Record]) -> dict[str, dict[int, Any]]:
    series: dict[str, dict[int, Any]] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            name = item.key or ".".join(item.nested_key)
            if not name.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                series.setdefault(name, {})[record.history.step.num] = json.loads(item.value_json)
    return series


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """W&B without network: offline mode, quiet, its settings and cache under tmp_path."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(name, value)
    try:
        yield
    finally:
        wandb.teardown()  # stops wandb's service process


@pytest.mark.usefixtures("wandb_offline")
def test_wandb_offline_run_directory_holds_the_runs_metrics(task_files, run_settings, tmp_path):
    run = _tiny_sft_run(task_files, run_settings, tmp_path / "runs", "wandb")
    # The service process writes the log asynchronously; stopping it flushes what is queued
    # (on a loaded machine `finish()` can return before the history records are on disk).
    wandb.teardown()
    run_id = (run / "wandb" / "alignkit-run-id").read_text().strip()
    logs = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 1, sorted(p.name for p in (run / "wandb").iterdir())
    records = _read_wandb_records(logs[0])

    expected = _jsonl_series(run)
    assert set(expected["loss"]) == {1, 2, 3}
    assert _history_series(records) == expected  # JSON numbers: the exact float64 values
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds.count("run") == 1 and kinds[-1] == "exit"  # one run, finished cleanly
    run_record = records[kinds.index("run")].run
    assert run_record.run_id == run_id
    logged_config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert logged_config["run_name"] == "tracked"
    assert logged_config["max_steps"] == 3
