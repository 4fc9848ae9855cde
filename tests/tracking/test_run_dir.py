"""Run directory paths and the overwrite helpers."""

from __future__ import annotations

from alignkit.tracking import RunDir, save_checkpoint


def test_paths_follow_the_design_layout(tmp_path):
    run = RunDir(tmp_path / "runs" / "demo")
    assert run.config_path.name == "config.yaml"
    assert run.metrics_path.name == "metrics.jsonl"
    assert run.summary_path.name == "summary.json"
    assert run.plots_dir.name == "plots"
    assert run.checkpoint_dir(12) == run.root / "checkpoints" / "step-12"


def test_results_are_detected_and_cleared_but_user_files_stay(tmp_path):
    run = RunDir(tmp_path).create()
    assert not run.has_results()
    run.metrics_path.write_text('{"step": 1}\n')
    save_checkpoint(run, 1, {}, None, {"step": 1})
    (run.root / "notes.txt").write_text("mine")
    assert run.has_results()
    run.clear_results()
    assert not run.has_results()
    assert (run.root / "notes.txt").read_text() == "mine"
