"""`alignkit pipeline`: stages in order, references checked first, skip, resume, --from, failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.data.synthetic import SyntheticTask
from alignkit.pipeline import TOOLS, PipelineError, load_pipeline, run_pipeline
from alignkit.tracking import latest_checkpoint, read_metrics

EXAMPLES = Path(__file__).parents[2] / "examples"
SRC = Path(__file__).parents[2] / "src"
QUIET = "logging.progress_bar=false, logging.plots=false"


def _write(tmp_path: Path, body: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).replace("EXAMPLES", str(EXAMPLES)))
    return path


def _offline(tmp_path: Path, sft_epochs: int = 1, checkpoint_every: str = "null") -> Path:
    return _write(
        tmp_path,
        f"""
        name: offline
        output_dir: {tmp_path}/runs
        stages:
          - name: data
            tool: data-synthetic
            args: {{out: {tmp_path}/data}}
          - name: sft
            method: sft
            config: EXAMPLES/sft.yaml
            overrides: [epochs={sft_epochs}, eval.every=7, "checkpoint.every={checkpoint_every}",
                        data.train_file={tmp_path}/data/sft_train.jsonl,
                        data.eval_file={tmp_path}/data/sft_heldout.jsonl, {QUIET}]
          - name: dpo
            method: dpo
            config: EXAMPLES/dpo.yaml
            overrides: ["model.name=${{stages.sft.model}}", max_steps=4, eval.every=2,
                        data.train_file={tmp_path}/data/preference_train.jsonl,
                        data.eval_file={tmp_path}/data/preference_heldout.jsonl,
                        data.max_eval_examples=32, {QUIET}]
          - name: judge
            tool: eval-task
            args: {{model: "${{stages.dpo.model}}", max_prompts: 4, max_new_tokens: 8}}
        """,
    )


def test_stages_run_in_order_and_a_rerun_skips_them(tmp_path: Path) -> None:
    spec = load_pipeline(_offline(tmp_path))
    first = run_pipeline(spec)
    assert [r.outcome for r in first] == ["ran"] * 4
    dpo = first[2]
    assert dpo.metric == "eval/rewards/margins"
    assert dpo.after > dpo.before + 0.05  # DPO widens the held-out implicit-reward margin
    assert Path(dpo.artifacts["model"]).is_dir()
    sft_mtime = (spec.root / "sft" / "metrics.jsonl").stat().st_mtime_ns
    second = run_pipeline(load_pipeline(_offline(tmp_path)))
    assert [r.outcome for r in second] == ["skipped"] * 4
    assert (spec.root / "sft" / "metrics.jsonl").stat().st_mtime_ns == sft_mtime
    state = yaml.safe_load((spec.root / "pipeline.yaml").read_text())
    assert [s["status"] for s in state["stages"]] == ["completed"] * 4
    # A changed stage re-runs, and so does every stage after it (its input changed).
    changed = run_pipeline(load_pipeline(_offline(tmp_path, sft_epochs=2)))
    assert [r.outcome for r in changed] == ["skipped", "ran", "ran", "ran"]
    again = run_pipeline(load_pipeline(_offline(tmp_path, sft_epochs=2)), from_stage="dpo")
    assert [r.outcome for r in again] == ["skipped", "skipped", "ran", "ran"]


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("${stages.dpo.model}", "refers to a later stage"),
        ("${stages.rm.model}", "no stage named 'rm'"),
        ("${stages.sft.weights}", "unknown artifact 'weights'"),
    ],
)
def test_a_bad_reference_is_an_error_before_anything_runs(
    tmp_path: Path, reference: str, message: str
) -> None:
    path = _write(
        tmp_path,
        f"""
        name: bad
        output_dir: {tmp_path}/runs
        stages:
          - name: sft
            method: sft
            config: EXAMPLES/sft.yaml
          - name: judge
            tool: eval-task
            args: {{model: "{reference}"}}
          - name: dpo
            method: dpo
            config: EXAMPLES/dpo.yaml
        """,
    )
    with pytest.raises(PipelineError, match=message):
        load_pipeline(path)
    assert not (tmp_path / "runs").exists()


def test_a_failed_stage_stops_the_pipeline_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        f"""
        name: failing
        output_dir: {tmp_path}/runs
        stages:
          - name: sft
            method: sft
            config: EXAMPLES/sft.yaml
            overrides: [data.train_file={tmp_path}/missing.jsonl]
          - name: judge
            tool: eval-task
            args: {{model: "${{stages.sft.model}}"}}
        """,
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", str(path)])
    assert exit_info.value.code == 2
    assert "stage 'sft' (sft) failed" in capsys.readouterr().err
    state = yaml.safe_load((tmp_path / "runs" / "failing" / "pipeline.yaml").read_text())
    assert [s["status"] for s in state["stages"]] == ["failed", "pending"]
    assert "no such file" in state["stages"][0]["error"]


def test_a_killed_stage_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    path = _offline(tmp_path, sft_epochs=6, checkpoint_every="7")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "pipeline", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sft_dir = tmp_path / "runs" / "offline" / "sft"
    deadline = time.monotonic() + 120
    try:
        while (latest_checkpoint(sft_dir) if sft_dir.is_dir() else None) is None:
            assert process.poll() is None, "the pipeline ended before its first SFT checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    cut = latest_checkpoint(sft_dir)
    state = yaml.safe_load((tmp_path / "runs" / "offline" / "pipeline.yaml").read_text())
    assert state["stages"][1]["status"] == "running"
    records = run_pipeline(load_pipeline(path))
    assert [r.outcome for r in records] == ["skipped", "resumed", "ran", "ran"]
    steps = [r["step"] for r in read_metrics(sft_dir / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == 6 * 14
    assert int(cut.name.split("-")[1]) < 6 * 14


def test_the_task_tools_can_give_prompts_as_one_user_message(tmp_path: Path) -> None:
    plain = TOOLS["data-synthetic"]({"out": str(tmp_path / "plain")}, tmp_path / "d1")
    chat = TOOLS["data-synthetic"]({"out": str(tmp_path / "chat"), "chat": True}, tmp_path / "d2")
    assert chat["files"] == plain["files"] + 6  # sft, preference, safety x train, held-out
    assert (tmp_path / "chat" / "chat_safety_heldout.jsonl").is_file()
    args = {"model": "tiny", "seed": 1, "max_prompts": 3, "max_new_tokens": 4, "chat": True}
    metrics = TOOLS["eval-task"](args, tmp_path / "judge")
    rows = [json.loads(line) for line in (tmp_path / "judge" / "generations.jsonl").open()]
    assert metrics["n_benign"] + metrics["n_harmful"] == len(rows) == 3
    held_out = SyntheticTask(seed=1).prompts("heldout")
    for row in rows:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert row["prompt"][0]["content"] in held_out
