"""The shared training loop, on a tiny regression net and a tiny Llama.

Pins down: it learns; gradient accumulation equals a larger batch; a crash + resume writes
the same metrics and weights as an uninterrupted run (dropout, controllers and the logging
window included); early stopping; evaluation; the run directory layout; precision and
gradient checkpointing; and two processes under `accelerate launch` give one process' curve.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import launched_loop
import pytest
import torch
from counting_llama import counting_sequences, tiny_llama
from launch_helpers import SimulatedKill, accelerate_launch
from launched_loop import Regressor
from rich.console import Console
from torch import nn

from alignkit.config import OptimConfig, TrainConfig, load_config
from alignkit.errors import CheckpointError, ConfigError
from alignkit.runloop import lr_multiplier
from alignkit.runloop.optimizer import build_optimizer
from alignkit.tracking import (
    TRAINER_STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    read_metrics,
)
from alignkit.trainers import Trainer

LAUNCHED_LOOP = Path(launched_loop.__file__)


class RegressionTrainer(Trainer):
    """Mean squared error; can die in the middle of a step like a killed process."""

    crash_at_call: int | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def compute_loss(self, model, batch):
        self.calls += 1
        if self.model.training and self.calls == self.crash_at_call:
            raise SimulatedKill
        x, y = batch
        prediction = model(x)
        return ((prediction - y) ** 2).mean(), {"mae": (prediction - y).abs().mean()}


class LossAverage:
    """A stateful controller: exponential average of the loss, updated each step."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.updates = 0

    def update(self, loss: float) -> None:
        self.value = loss if self.value is None else 0.9 * self.value + 0.1 * loss
        self.updates += 1

    def state_dict(self):
        return {"value": self.value, "updates": self.updates}

    def load_state_dict(self, state):
        self.value, self.updates = state["value"], state["updates"]


class ControlledTrainer(RegressionTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_average = LossAverage()
        self.register_controller("loss_average", self.loss_average)

    def after_optimizer_step(self, metrics):
        self.loss_average.update(float(metrics["loss"]))
        return {"loss_average": self.loss_average.value}


def regression_data(n: int = 44) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.randn(4, generator=generator) + 0.1 * torch.randn(n, generator=generator)
    return list(zip(x, y, strict=True))


def make_config(tmp_path: Path, name: str, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        [
            f"output_dir={tmp_path}",
            f"run_name={name}",
            "logging.progress_bar=false",
            "logging.plots=false",  # drawn in the one test that looks at them
            "optim.lr=3e-2",
            *overrides,
        ],
    )


def run(trainer_cls, config, *, dropout=0.0, data=None, crash_at_call=None, **kwargs):
    torch.manual_seed(1)
    trainer = trainer_cls(config, Regressor(dropout), data or regression_data(), **kwargs)
    trainer.crash_at_call = crash_at_call
    return trainer, trainer.train()


def losses(path: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(path) if "loss" in r]


def test_loss_decreases_on_a_regression_task(tmp_path):
    config = make_config(tmp_path, "learn", "epochs=5", "examples_per_device=8", "logging.every=1")
    _, summary = run(RegressionTrainer, config)
    curve = losses(tmp_path / "learn" / "metrics.jsonl")
    assert len(curve) == 30  # ceil(44 / 8) steps per epoch x 5 epochs
    assert sum(curve[-5:]) / 5 < 0.25 * sum(curve[:5]) / 5
    assert summary["stop_reason"] == "epochs" and summary["step"] == 30


def test_run_directory_matches_the_design(tmp_path):
    config = make_config(
        tmp_path,
        "layout",
        "epochs=2",
        "examples_per_device=8",
        "logging.every=2",
        "checkpoint.every=4",
        "checkpoint.keep_last=2",
        "logging.plots=true",
    )
    run(RegressionTrainer, config)
    root = tmp_path / "layout"
    assert sorted(p.name for p in root.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "plots",
        "summary.json",
    ]
    assert [p.name for p in list_checkpoints(root)] == ["step-8", "step-12"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-12", "step-8"]
    final = latest_checkpoint(root)
    assert sorted(p.name for p in final.iterdir()) == ["model", TRAINER_STATE_FILE]
    assert (final / "model" / "model.safetensors").is_file()
    state = load_trainer_state(final)
    assert {"optimizer", "scheduler", "rng", "controllers", "step", "epoch"} <= set(state)
    assert load_config(TrainConfig, root / "config.yaml") == config
    records = read_metrics(root / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    assert all({"step", "epoch", "loss", "mae", "lr", "grad_norm"} <= set(r) for r in records)
    assert records[-1]["epoch"] == 2.0
    assert sorted(p.name for p in (root / "plots").iterdir()) == [
        "grad_norm.png",
        "loss.png",
        "lr.png",
        "mae.png",
    ]
    summary = (root / "summary.json").read_text()
    assert '"stop_reason": "epochs"' in summary


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    data = regression_data(48)
    big, _ = run(
        RegressionTrainer,
        make_config(tmp_path, "big", "examples_per_device=4", "epochs=2", "logging.every=1"),
        data=data,
    )
    small, _ = run(
        RegressionTrainer,
        make_config(
            tmp_path,
            "accum",
            "examples_per_device=2",
            "grad_accum_steps=2",
            "epochs=2",
            "logging.every=1",
        ),
        data=data,
    )
    big_curve, accum_curve = (losses(tmp_path / n / "metrics.jsonl") for n in ("big", "accum"))
    assert len(big_curve) == len(accum_curve) == 24
    assert accum_curve == pytest.approx(big_curve, rel=1e-5)
    for a, b in zip(
        big.unwrapped_model.parameters(), small.unwrapped_model.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    # 44 examples / 4 per device = 11 batches per epoch; 2 per step -> 6 steps per epoch, the
    # last with one batch. Checkpoints at 4 and 8 fall inside a logging window (every 3).
    settings = (
        "epochs=3",
        "examples_per_device=4",
        "grad_accum_steps=2",
        "logging.every=3",
        "checkpoint.every=4",
    )
    whole, _ = run(ControlledTrainer, make_config(tmp_path, "whole", *settings), dropout=0.2)
    # Killed during step 11, after step 9 was logged and step 8 checkpointed.
    with pytest.raises(SimulatedKill):
        run(
            ControlledTrainer,
            make_config(tmp_path, "cut", *settings),
            dropout=0.2,
            crash_at_call=21,
        )
    cut = tmp_path / "cut"
    assert latest_checkpoint(cut).name == "step-8"
    assert [r["step"] for r in read_metrics(cut / "metrics.jsonl")] == [3, 6, 9]
    saved = load_trainer_state(cut / "checkpoints" / "step-8")["controllers"]["loss_average"]
    assert saved["updates"] == 8

    torch.manual_seed(123)  # the resumed process starts from other random weights and RNG
    resumed = ControlledTrainer(
        make_config(tmp_path, "ignored", *settings, f"resume_from={cut}"),
        Regressor(0.2),
        regression_data(),
    )
    resumed.train()

    expected = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    got = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [3, 6, 9, 12, 15, 18]
    for want, have in zip(expected, got, strict=True):
        assert have.keys() == want.keys()
        for key in want:
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (want["step"], key)
    for a, b in zip(
        whole.unwrapped_model.parameters(), resumed.unwrapped_model.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.loss_average.updates == 18
    assert resumed.loss_average.value == pytest.approx(whole.loss_average.value, rel=1e-6)
    assert not (tmp_path / "ignored").exists()


def test_resume_refuses_settings_that_change_the_data_order(tmp_path):
    run(RegressionTrainer, make_config(tmp_path, "r", "max_steps=2"))
    config = make_config(
        tmp_path, "r", "max_steps=4", "examples_per_device=4", "resume_from=" + str(tmp_path / "r")
    )
    with pytest.raises(CheckpointError, match=r"examples_per_device 8 -> 4"):
        RegressionTrainer(config, Regressor(), regression_data()).train()


def test_resume_needs_the_same_controllers(tmp_path):
    run(ControlledTrainer, make_config(tmp_path, "c", "max_steps=2"))
    config = make_config(tmp_path, "c", "max_steps=4", f"resume_from={tmp_path / 'c'}")
    with pytest.raises(CheckpointError, match="controllers differ"):
        RegressionTrainer(config, Regressor(), regression_data()).train()


def test_resume_extends_a_finished_run(tmp_path):
    run(RegressionTrainer, make_config(tmp_path, "e", "max_steps=3", "logging.every=1"))
    extended = make_config(
        tmp_path, "e", "max_steps=5", "logging.every=1", f"resume_from={tmp_path / 'e'}"
    )
    _, summary = run(RegressionTrainer, extended)
    assert [r["step"] for r in read_metrics(tmp_path / "e" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert summary["step"] == 5


def test_resume_from_an_older_checkpoint_abandons_the_later_ones(tmp_path):
    settings = ("max_steps=6", "logging.every=1", "checkpoint.every=2", "checkpoint.keep_last=null")
    run(RegressionTrainer, make_config(tmp_path, "t", *settings))
    first = read_metrics(tmp_path / "t" / "metrics.jsonl")
    older = tmp_path / "t" / "checkpoints" / "step-2"
    shorter = make_config(tmp_path, "t", *settings, "max_steps=4", f"resume_from={older}")
    run(RegressionTrainer, shorter)
    assert [p.name for p in list_checkpoints(tmp_path / "t")] == ["step-2", "step-4"]
    again = read_metrics(tmp_path / "t" / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[:2] == first[:2]  # kept as written


def test_resume_from_a_missing_directory_is_an_error(tmp_path):
    config = make_config(tmp_path, "x", f"resume_from={tmp_path / 'nothing'}")
    with pytest.raises(CheckpointError, match="no such run directory"):
        RegressionTrainer(config, Regressor(), regression_data()).train()


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    (tmp_path / "fresh" / "checkpoints" / ".tmp-step-2-x").mkdir(parents=True)
    config = make_config(tmp_path, "_", "max_steps=2", f"resume_from={tmp_path / 'fresh'}")
    _, summary = run(RegressionTrainer, config)
    assert summary["step"] == 2
    assert [p.name for p in list_checkpoints(tmp_path / "fresh")] == ["step-2"]


def test_an_existing_run_is_kept_unless_overwrite(tmp_path):
    run(RegressionTrainer, make_config(tmp_path, "once", "max_steps=1"))
    with pytest.raises(ConfigError, match=r"already holds a run.*resume_from"):
        run(RegressionTrainer, make_config(tmp_path, "once", "max_steps=1"))
    _, summary = run(
        RegressionTrainer, make_config(tmp_path, "once", "max_steps=2", "overwrite=true")
    )
    assert summary["step"] == 2
    assert [p.name for p in list_checkpoints(tmp_path / "once")] == ["step-2"]


class ScriptedEvalTrainer(RegressionTrainer):
    """Evaluation returns a scripted sequence of scores."""

    scores: tuple[float, ...] = ()

    def evaluate(self):
        index = getattr(self, "evaluations", 0)
        self.evaluations = index + 1
        torch.rand(5)  # evaluation drawing random numbers must not shift training
        return {"eval/score": self.scores[index]}


def test_early_stopping_stops_after_patience_evaluations(tmp_path):
    class Worsening(ScriptedEvalTrainer):
        scores = (1.0, 0.8, 0.85, 0.9, 0.95, 1.0)

    config = make_config(
        tmp_path,
        "stop",
        "epochs=5",
        "eval.every=2",
        "eval.early_stopping.metric=eval/score",
        "eval.early_stopping.patience=2",
        "logging.every=100",
    )
    _, summary = run(Worsening, config)
    # Evaluations at steps 2, 4 (best), 6, 8: two without improvement -> stop at 8.
    assert summary["stop_reason"] == "early_stopping"
    assert summary["step"] == 8
    assert summary["best"] == {
        "metric": "eval/score",
        "value": 0.8,
        "step": 4,
        "checkpoint": str(tmp_path / "stop" / "checkpoints" / "step-4"),
    }
    assert latest_checkpoint(tmp_path / "stop").name == "step-8"
    records = read_metrics(tmp_path / "stop" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert "loss" in records[-1]  # the last step logs the training window too


def test_maximised_metric_that_keeps_improving_never_stops(tmp_path):
    class Improving(ScriptedEvalTrainer):
        scores = tuple(0.1 * i for i in range(20))

    config = make_config(
        tmp_path,
        "go",
        "max_steps=6",
        "eval.every=1",
        "eval.early_stopping.metric=eval/score",
        "eval.early_stopping.mode=max",
        "eval.early_stopping.patience=1",
    )
    _, summary = run(Improving, config)
    assert summary["stop_reason"] == "max_steps" and summary["step"] == 6


def test_early_stopping_on_a_metric_evaluation_does_not_report(tmp_path):
    class Scores(ScriptedEvalTrainer):
        scores = (1.0,) * 10

    config = make_config(
        tmp_path, "m", "max_steps=2", "eval.every=1", "eval.early_stopping.metric=eval/los"
    )
    with pytest.raises(ConfigError, match=r"eval/los.*: eval/score\. Did you mean 'eval/score'"):
        run(Scores, config)


def test_early_stopping_without_evaluation_is_a_config_error(tmp_path):
    config = make_config(tmp_path, "n", "max_steps=2", "eval.early_stopping.metric=eval/loss")
    with pytest.raises(ConfigError, match="needs evaluation"):
        run(RegressionTrainer, config)


def test_default_evaluation_averages_compute_loss_over_the_eval_set(tmp_path):
    data = regression_data(60)
    config = make_config(tmp_path, "ev", "max_steps=5", "eval.every=2", "logging.every=5")
    trainer, summary = run(RegressionTrainer, config, data=data[:44], eval_dataset=data[44:])
    records = read_metrics(tmp_path / "ev" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 5]  # evaluated at 2, 4 and at the end
    assert {"eval/loss", "eval/mae"} <= set(records[0])
    x = torch.stack([row[0] for row in data[44:]])
    y = torch.stack([row[1] for row in data[44:]])
    with torch.no_grad():
        final_mse = ((trainer.unwrapped_model(x) - y) ** 2).mean().item()
    # Eval batches are equal-sized (16 rows, 8 per batch), so mean of batch means = mean.
    assert summary["eval"]["eval/loss"] == pytest.approx(final_mse, rel=1e-5)


def test_evaluation_does_not_change_the_training_curve(tmp_path):
    class Scores(ScriptedEvalTrainer):
        scores = (1.0,) * 10

    settings = ("max_steps=8", "logging.every=1")
    run(RegressionTrainer, make_config(tmp_path, "plain", *settings), dropout=0.3)
    run(Scores, make_config(tmp_path, "evaluated", *settings, "eval.every=2"), dropout=0.3)
    assert losses(tmp_path / "evaluated" / "metrics.jsonl") == losses(
        tmp_path / "plain" / "metrics.jsonl"
    )


def test_logged_learning_rate_follows_warmup_then_cosine(tmp_path):
    config = make_config(
        tmp_path,
        "lr",
        "max_steps=10",
        "logging.every=1",
        "optim.warmup_steps=4",
        "optim.schedule=cosine",
    )
    run(RegressionTrainer, config)
    logged = [r["lr"] for r in read_metrics(tmp_path / "lr" / "metrics.jsonl")]
    assert logged[:4] == pytest.approx([0.0075, 0.015, 0.0225, 0.03])
    assert logged[4] == pytest.approx(0.03)
    assert all(a > b for a, b in itertools.pairwise(logged[4:]))
    assert lr_multiplier(9, schedule="cosine", warmup=4, total_steps=10) == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 6)).item())
    )


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("constant", [1.0, 1.0, 1.0, 1.0]), ("linear", [1.0, 0.75, 0.5, 0.25])],
)
def test_lr_multiplier_without_warmup(schedule, expected):
    got = [lr_multiplier(s, schedule=schedule, warmup=0, total_steps=4) for s in range(4)]
    assert got == pytest.approx(expected)


def test_metric_names_must_not_change_between_calls(tmp_path):
    class Fickle(RegressionTrainer):
        def compute_loss(self, model, batch):
            loss, _ = super().compute_loss(model, batch)
            return loss, ({"a": 1.0} if self.calls == 1 else {"b": 1.0})

    with pytest.raises(RuntimeError, match="same names"):
        run(Fickle, make_config(tmp_path, "f", "max_steps=2"))


def test_controllers_must_be_stateful_and_uniquely_named(tmp_path):
    trainer = RegressionTrainer(make_config(tmp_path, "c"), Regressor(), regression_data())
    with pytest.raises(TypeError, match="state_dict"):
        trainer.register_controller("x", object())
    trainer.register_controller("x", LossAverage())
    with pytest.raises(ValueError, match="already registered"):
        trainer.register_controller("x", LossAverage())


def test_trainer_console_format_prints_one_line_per_log(tmp_path):
    class Formatted(RegressionTrainer):
        console_format = "Epoch {epoch_number} step {step} loss={loss:.3f} mae={mae:.3f}"

    trainer = Formatted(
        make_config(tmp_path, "fmt", "max_steps=4", "logging.every=2"),
        Regressor(),
        regression_data(),
    )
    buffer = io.StringIO()
    trainer.console = Console(file=buffer, width=200)
    trainer.train()
    lines = buffer.getvalue().splitlines()
    assert [line.split(" loss=")[0] for line in lines] == ["Epoch 1 step 2", "Epoch 1 step 4"]
    records = read_metrics(tmp_path / "fmt" / "metrics.jsonl")
    assert lines[1].endswith(f"loss={records[1]['loss']:.3f} mae={records[1]['mae']:.3f}")
    config = make_config(tmp_path, "quiet", "max_steps=2", 'logging.console_format=""')
    quiet = Formatted(config, Regressor(), regression_data())
    quiet.console = Console(file=io.StringIO(), width=200)
    quiet.train()
    assert quiet.console.file.getvalue() == ""


def test_helpers_for_frozen_models_and_ordered_batches(tmp_path):
    trainer = RegressionTrainer(make_config(tmp_path, "h"), Regressor(), regression_data())
    reference = trainer.prepare_frozen(Regressor())
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    batches = list(trainer.ordered_loader(regression_data(10), examples_per_device=4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert torch.equal(
        torch.cat([x for x, _ in batches]), torch.stack([x for x, _ in regression_data(10)])
    )


def test_bf16_autocast_runs_the_forward_in_bfloat16(tmp_path):
    class DtypeSpy(RegressionTrainer):
        def on_train_begin(self):
            # accelerate casts the model's outputs back to fp32: look inside instead.
            first_layer = self.unwrapped_model.net[0]
            first_layer.register_forward_hook(lambda _m, _i, out: setattr(self, "dtype", out.dtype))

    trainer, _ = run(DtypeSpy, make_config(tmp_path, "bf16", "precision=bf16", "epochs=3"))
    assert trainer.dtype == torch.bfloat16
    assert next(trainer.unwrapped_model.parameters()).dtype == torch.float32
    curve = losses(tmp_path / "bf16" / "metrics.jsonl")
    assert curve[-1] < 0.6 * curve[0]  # measured: 2.61 -> 1.00 in bf16
    trainer, _ = run(DtypeSpy, make_config(tmp_path, "fp32", "max_steps=1"))
    assert trainer.dtype == torch.float32  # a later fp32 run in the same process


def test_gradient_checkpointing_needs_a_model_that_supports_it(tmp_path):
    config = make_config(tmp_path, "gc", "gradient_checkpointing=true")
    with pytest.raises(ConfigError, match="does not support it"):
        RegressionTrainer(config, Regressor(), regression_data())


# --------------------------------------------------------------------------------------
# A tiny Llama (tied embeddings, Hugging Face checkpoints)
# --------------------------------------------------------------------------------------


class CausalLMTrainer(Trainer):
    def compute_loss(self, model, batch):
        return model(**batch).loss, {}


def test_tiny_llama_learns_saves_hf_checkpoints_and_resumes_exactly(tmp_path):
    from transformers import LlamaForCausalLM

    settings = ("epochs=3", "examples_per_device=8", "logging.every=2", "optim.lr=3e-3")
    whole = CausalLMTrainer(
        make_config(tmp_path, "lm", *settings), tiny_llama(), counting_sequences()
    )
    whole.train()
    records = read_metrics(tmp_path / "lm" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"] - 0.4
    assert all(r["tokens_per_s"] > 0 for r in records)
    final = latest_checkpoint(tmp_path / "lm") / "model"
    assert {"config.json", "model.safetensors"} <= {p.name for p in final.iterdir()}
    reloaded = LlamaForCausalLM.from_pretrained(final)
    for a, b in zip(reloaded.parameters(), whole.unwrapped_model.parameters(), strict=True):
        assert torch.equal(a, b)

    class Killed(CausalLMTrainer):
        def compute_loss(self, model, batch):
            if self.state.step == 10:
                raise SimulatedKill
            return super().compute_loss(model, batch)

    cut = make_config(tmp_path, "lm-cut", *settings, "checkpoint.every=6")
    with pytest.raises(SimulatedKill):
        Killed(cut, tiny_llama(), counting_sequences()).train()
    resumed = make_config(tmp_path, "_", *settings, f"resume_from={tmp_path / 'lm-cut'}")
    CausalLMTrainer(resumed, tiny_llama(), counting_sequences()).train()
    got = read_metrics(tmp_path / "lm-cut" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in records]
    for want, have in zip(records, got, strict=True):
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert have["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    settings = ("max_steps=3", "examples_per_device=8", "logging.every=1", "optim.lr=3e-3")
    plain = make_config(tmp_path, "plain", *settings)
    checkpointed = make_config(tmp_path, "ckpt", *settings, "gradient_checkpointing=true")
    CausalLMTrainer(plain, tiny_llama(), counting_sequences()).train()
    trainer = CausalLMTrainer(checkpointed, tiny_llama(), counting_sequences())
    assert trainer.model.is_activation_checkpointing
    trainer.train()
    assert losses(tmp_path / "ckpt" / "metrics.jsonl") == pytest.approx(
        losses(tmp_path / "plain" / "metrics.jsonl"), rel=1e-5
    )


# --------------------------------------------------------------------------------------
# Two processes (DDP over gloo) under `accelerate launch`
# --------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_accumulation_and_resume(tmp_path):
    # One launch makes the two-process runs: "two", "cut" killed in step 8, "cut" resumed.
    launched = accelerate_launch(LAUNCHED_LOOP, str(tmp_path), root=tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    launched_loop.train(f"output_dir={tmp_path}", "run_name=one", "grad_accum_steps=2")
    two_records = read_metrics(tmp_path / "two" / "metrics.jsonl")
    # 64 rows, 4 per device, 2 devices: 8 steps per epoch, as 1 device with 2 accumulations.
    assert [r["step"] for r in two_records] == list(range(1, 17))
    assert two_records[-1]["epoch"] == 2.0
    two_curve = [r["loss"] for r in two_records]
    assert sum(two_curve[-4:]) < 0.4 * sum(two_curve[:4])
    # DDP averages the two processes' gradients: the same update as accumulating both
    # batches on one process, so the curves agree up to float summation order.
    assert two_curve == pytest.approx(losses(tmp_path / "one" / "metrics.jsonl"), rel=1e-5)

    at_kill = json.loads((tmp_path / "cut-at-kill.json").read_text())
    assert at_kill == {"latest_checkpoint": "step-6", "logged_steps": list(range(1, 8))}
    cut_records = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["loss"] for r in cut_records] == pytest.approx(two_curve, rel=1e-6)
    state = load_trainer_state(tmp_path / "cut" / "checkpoints" / "step-16")
    assert len(state["rng"]) == 2  # one RNG state per process


def test_optimizer_is_fused_adamw_with_decay_on_matrices_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.01))
    assert optimizer.defaults["fused"] is True
    decays = {len(g["params"]): g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {1: 0.01, 3: 0.0}  # the Linear weight; its bias and the norm's two


def test_fused_adamw_step_equals_the_plain_update():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    plain = nn.Linear(5, 3)
    plain.load_state_dict(model.state_dict())
    fused = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.01))
    reference = torch.optim.AdamW(
        [
            {"params": [plain.weight], "weight_decay": 0.01},
            {"params": [plain.bias], "weight_decay": 0.0},
        ],
        lr=0.1,
        foreach=False,
    )
    for _ in range(3):
        x = torch.randn(4, 5)
        for net, optimizer in ((model, fused), (plain, reference)):
            optimizer.zero_grad()
            net(x).square().sum().backward()
            optimizer.step()
    torch.testing.assert_close(model.weight, plain.weight)
    torch.testing.assert_close(model.bias, plain.bias)


def test_a_misspelled_early_stopping_metric_fails_at_the_first_evaluation(tmp_path):
    class Scored(ScriptedEvalTrainer):
        scores = (1.0, 0.9, 0.8)

    config = make_config(
        tmp_path,
        "typo",
        "max_steps=6",
        "eval.every=2",
        "eval.early_stopping.metric=eval/scroe",
    )
    trainer = Scored(config, Regressor(), regression_data())
    message = (
        r"eval.early_stopping.metric='eval/scroe' is not among the evaluation metrics "
        r"\(first evaluation, step 2\): eval/score. Did you mean 'eval/score'\?"
    )
    with pytest.raises(ConfigError, match=message):
        trainer.train()
    assert trainer.evaluations == 1
