"""Plots: one non-empty PNG per metric group, chosen names only, smoothing that keeps level."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest

from alignkit.errors import ConfigError
from alignkit.tracking.plots import ema, plot_metrics, stacked_panels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with path.open("w") as handle:
        for step in range(1, 41):
            record = {
                "step": step,
                "epoch": step / 40,
                "loss": 1.0 / step + 0.05 * math.sin(step),
                "loss_H": 0.7,
                "loss_S": 0.6,
                "rewards/chosen": 0.01 * step,
                "rewards/rejected": -0.01 * step,
                "rewards/accuracies": min(1.0, 0.5 + step / 80),
                "lambda": 1.0 + 0.01 * step,
                "J_C": 0.1 - 0.005 * step,
                "lr": 1e-5,
                "grad_norm": 2.0,
                "tokens_per_s": 1000.0,
                "actor/entropy": 2.0,
                "actor/pg_clipfrac": 0.1,
                "flag": True,  # not a number: skipped
            }
            if step % 10 == 0:
                record["eval/loss"] = 1.0 / step
            handle.write(json.dumps(record) + "\n")
    return path


def test_each_group_gets_a_non_empty_png(tmp_path, metrics_file):
    written = plot_metrics(metrics_file, tmp_path / "plots")
    names = sorted(p.stem for p in written)
    assert names == sorted(
        ["loss", "rewards", "accuracy", "lambda", "lr", "grad_norm", "throughput", "actor"]
    )
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, path


def test_plot_only_named_metrics(tmp_path, metrics_file):
    written = plot_metrics(metrics_file, tmp_path, names=["lambda", "J_C", "eval/loss"])
    assert sorted(p.name for p in written) == ["lambda.png", "loss.png"]


def test_unknown_metric_name_suggests_a_logged_one(tmp_path, metrics_file):
    with pytest.raises(ConfigError, match=r"did you mean 'lambda'"):
        plot_metrics(metrics_file, tmp_path, names=["lamda"])


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path, metrics_file):
    before = matplotlib.get_backend()
    plot_metrics(metrics_file, tmp_path, names=["loss"])
    assert matplotlib.get_backend() == before


def test_ema_keeps_a_constant_curve_constant_and_smooths_noise():
    assert ema([3.0] * 50) == pytest.approx([3.0] * 50)
    noisy = [(-1.0) ** i for i in range(100)]
    smoothed = ema(noisy)
    assert max(abs(v) for v in smoothed[20:]) < 0.2
    assert smoothed[0] == 1.0  # debiased: the first point is the first value


def test_stacked_panels_share_an_axis_with_eval_twins_and_per_batch_values():
    names = ["J_C_batch", "delta_S_mean", "lambda", "J_C", "eval/delta_S_mean", "eval/kl"]
    assert stacked_panels(names) == [
        ["J_C", "J_C_batch"],  # the controller's EMA names the axis; the raw batches go under it
        ["delta_S_mean", "eval/delta_S_mean"],
        ["lambda"],
        ["eval/kl"],  # an eval metric without its training twin keeps an axis of its own
    ]
    assert stacked_panels(["J_C_batch"]) == [["J_C_batch"]]
    ordered = stacked_panels(names, order=("lambda", "J_C"))
    assert [panel[0] for panel in ordered] == ["lambda", "J_C", "delta_S_mean", "eval/kl"]


def test_lambda_figure_holds_j_c_batch_instead_of_a_figure_of_its_own(tmp_path, metrics_file):
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    with metrics_file.open("w") as handle:
        for record in records:
            handle.write(json.dumps({**record, "J_C_batch": record["J_C"] + 0.1}) + "\n")
    written = {p.name for p in plot_metrics(metrics_file, tmp_path)}
    assert "lambda.png" in written and "J_C_batch.png" not in written
