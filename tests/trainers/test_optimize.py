"""OptimizerStep and the run lifecycle around it.

Pins down: the gradient of a step is that of (sum of unit losses) / (the step's units) however
the step is split into micro-batches (directly, through SFT on ragged completions, and over two
gloo processes); a step with a non-finite gradient norm changes neither the weights nor Adam's
state, is counted, reported and checkpointed, and too many in a row stop the run; format-1
checkpoints still resume.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import launched_optimize
import pytest
import torch
from counting_llama import tiny_llama
from launch_helpers import accelerate_launch
from rich.console import Console
from torch import nn

from alignkit.config import TrainConfig, load_config
from alignkit.data import SFTCollator
from alignkit.data.tokenize import IGNORE_INDEX
from alignkit.errors import CheckpointError, TrainingDivergedError
from alignkit.runloop import OptimizerStep
from alignkit.runloop.optimizer import build_lr_scheduler, build_optimizer
from alignkit.runloop.runtime import make_accelerator
from alignkit.tracking import latest_checkpoint, load_trainer_state, read_metrics
from alignkit.tracking.checkpoint import TRAINER_STATE_FILE
from alignkit.trainers import Trainer
from alignkit.trainers.sft import SFTTrainer

LAUNCHED_OPTIMIZE = Path(launched_optimize.__file__)


def config(tmp_path: Path, name: str, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        [
            f"output_dir={tmp_path}",
            f"run_name={name}",
            "logging.progress_bar=false",
            "logging.plots=false",  # drawing them is most of a short run's time
            *overrides,
        ],
    )


# --------------------------------------------------------------------------------------
# OptimizerStep on its own
# --------------------------------------------------------------------------------------


def _linear_step(tmp_path: Path, *overrides: str, sgd: bool = False, say=None) -> OptimizerStep:
    cfg = config(tmp_path, "unused", *overrides)
    accelerator = make_accelerator(cfg, precision="fp32")
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    if sgd:
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    else:
        optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps=100)
    model, optimizer = accelerator.prepare(model, optimizer)
    return OptimizerStep(
        accelerator,
        model,
        optimizer,
        scheduler,
        max_grad_norm=cfg.optim.max_grad_norm,
        max_consecutive_skipped_steps=cfg.optim.max_consecutive_skipped_steps,
        say=say,
    )


def test_the_update_does_not_depend_on_how_the_step_is_split(tmp_path):
    """SGD with lr 1: the update is minus the gradient of sum(w * err^2) / sum(w)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=generator)
    y = torch.randn(8, generator=generator)
    units = torch.tensor([1.0, 7.0, 2.0, 9.0, 1.0, 3.0, 12.0, 5.0])  # ragged weights

    def loss_fn(rows, normaliser):
        index = torch.tensor(rows)
        error = (step.model(x[index]).squeeze(-1) - y[index]) ** 2
        return (units[index] * error).sum() / normaliser

    def count(rows):
        return units[torch.tensor(rows)].sum()

    updates = []
    for split in ([list(range(8))], [[0, 1, 2], [3, 4, 5, 6, 7]], [[0], [1], [2, 3, 4, 5, 6, 7]]):
        step = _linear_step(tmp_path, "optim.max_grad_norm=null", sgd=True)
        before = [p.detach().clone() for p in step.model.parameters()]
        outcome = step.run(split, loss_fn, count, step=1)
        assert float(outcome.units) == float(units.sum())
        updates.append(
            [p.detach() - b for p, b in zip(step.model.parameters(), before, strict=True)]
        )

    torch.manual_seed(0)
    reference = nn.Linear(3, 1)
    loss = (units * (reference(x).squeeze(-1) - y) ** 2).sum() / units.sum()
    loss.backward()
    expected = [-p.grad for p in reference.parameters()]
    for update in updates:
        for got, want in zip(update, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_metric_shares_add_up_to_the_step_value_however_the_step_is_split(tmp_path):
    # A metric returned as (sum over the micro-batch) / N is summed over the micro-batches:
    # the step's weighted mean, the same for every split; a plain loss returns no metrics.
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, generator=generator)
    units = torch.tensor([1.0, 7.0, 2.0, 9.0, 1.0, 3.0, 12.0, 5.0])
    values = torch.randn(8, generator=generator)

    def loss_fn(rows, normaliser):
        index = torch.tensor(rows)
        share = (units[index] * step.model(x[index]).squeeze(-1)).sum() / normaliser
        # A mean over the micro-batch's units (as a clip fraction over its tokens), as a share.
        mean = (units[index] * values[index]).sum() / units[index].sum()
        return share, {"loss": share, "value": mean * units[index].sum() / normaliser}

    def count(rows):
        return units[torch.tensor(rows)].sum()

    want = (units * values).sum() / units.sum()
    for split in ([list(range(8))], [[0, 1, 2], [3, 4, 5, 6, 7]], [[0], [1], [2, 3, 4, 5, 6, 7]]):
        step = _linear_step(tmp_path, "optim.max_grad_norm=null", sgd=True)
        outcome = step.run(split, loss_fn, count, step=1)
        assert set(outcome.metrics) == {"loss", "value"}
        torch.testing.assert_close(outcome.metrics["loss"], outcome.loss)
        torch.testing.assert_close(outcome.metrics["value"], want)
        means = [(units * values)[rows].sum() / units[rows].sum() for rows in split]
        if len(split) > 1:  # the plain mean of the micro-batch means is another number
            assert abs(float(sum(means)) / len(means) - float(want)) > 1e-3
    plain = _linear_step(tmp_path, sgd=True).run(
        [[0, 1]], lambda r, n: loss_fn(r, n)[0], count, step=1
    )
    assert plain.metrics == {}


def test_one_cpu_process_clips_and_steps_the_torch_optimizer_itself(tmp_path, monkeypatch):
    """Without processes to sync or a gradient scaler, accelerate's optimizer wrapper (an
    importlib lookup per step) is bypassed; the gradient is still clipped to max_grad_norm."""
    from accelerate.optimizer import AcceleratedOptimizer

    def refuse(*args, **kwargs):
        raise AssertionError("accelerate's wrapper was called")

    monkeypatch.setattr(AcceleratedOptimizer, "step", refuse)
    monkeypatch.setattr(AcceleratedOptimizer, "zero_grad", refuse)
    step = _linear_step(tmp_path, "optim.max_grad_norm=0.5", sgd=True)
    x, y = torch.ones(2, 3), torch.tensor([10.0, -30.0])
    before = [p.detach().clone() for p in step.model.parameters()]

    def loss_fn(rows, normaliser):
        return ((step.model(x).squeeze(-1) - y) ** 2).sum() / normaliser

    outcome = step.run([None], loss_fn, lambda rows: 2, step=1)
    update = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(step.model.parameters(), before, strict=True)]
    )
    assert float(outcome.grad_norm) > 0.5
    # SGD with lr 1 moves by minus the clipped gradient: its norm is max_grad_norm.
    torch.testing.assert_close(update.norm(), torch.tensor(0.5), rtol=1e-5, atol=0)
    assert all(p.grad is None for p in step.model.parameters())


def test_a_non_finite_step_is_skipped_counted_and_reported(tmp_path):
    messages: list[str] = []
    step = _linear_step(tmp_path, "optim.max_consecutive_skipped_steps=2", say=messages.append)
    x = torch.randn(4, 3)

    def finite(batch, normaliser):
        return step.model(batch).square().sum() / normaliser

    def poisoned(value):
        return lambda batch, normaliser: step.model(batch).sum() * value / normaliser

    def rows(batch):
        return batch.shape[0]

    assert not step.run([x], finite, rows, step=1).skipped
    params = [p.detach().clone() for p in step.model.parameters()]
    adam = copy.deepcopy(step.optimizer.state_dict())
    outcome = step.run([x, x], poisoned(float("nan")), rows, step=2)
    assert outcome.skipped and not torch.isfinite(outcome.grad_norm)
    for now, then in zip(step.model.parameters(), params, strict=True):
        assert torch.equal(now, then)
        assert now.grad is None
    after = step.optimizer.state_dict()["state"]
    assert set(after) == set(adam["state"])
    for index, tensors in adam["state"].items():
        for key, value in tensors.items():
            assert torch.equal(after[index][key], value), key
    assert float(after[0]["step"]) == 1.0
    assert step.scheduler.last_epoch == 2  # the schedule follows the step number
    assert step.skipped_steps == 1
    assert messages == [
        "step 2: gradient norm of model is nan; optimizer step skipped (1 in a row, 1 in all)"
    ]

    assert not step.run([x], finite, rows, step=3).skipped
    assert float(step.optimizer.state_dict()["state"][0]["step"]) == 2.0
    assert step.consecutive_skipped == 0
    assert step.run([x], poisoned(float("inf")), rows, step=4).skipped
    assert step.run([x], poisoned(float("nan")), rows, step=5).skipped
    with pytest.raises(TrainingDivergedError, match=r"step 6: 3 optimizer steps of model in a row"):
        step.run([x], poisoned(float("nan")), rows, step=6)
    assert step.skipped_steps == 4


# --------------------------------------------------------------------------------------
# Through the Trainer
# --------------------------------------------------------------------------------------


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class NaNAtStep(Trainer):
    """Mean squared error; the loss of the steps in `poisoned_steps` is NaN."""

    poisoned_steps: tuple[int, ...] = ()

    def compute_loss(self, model, batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        if self.state.step + 1 in self.poisoned_steps:
            loss = loss * float("nan")
        return loss, {}


def regression_rows(n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return list(zip(x, x.sum(-1), strict=True))


def test_skipped_steps_are_logged_summarised_and_checkpointed(tmp_path):
    trainer = NaNAtStep(
        config(tmp_path, "nan", "max_steps=4", "logging.every=1", "examples_per_device=8"),
        Regressor(),
        regression_rows(),
    )
    trainer.poisoned_steps = (2,)
    buffer = io.StringIO()
    trainer.console = Console(file=buffer, width=200)
    summary = trainer.train()
    assert summary["skipped_steps"] == 1 and summary["step"] == 4
    assert "step 2: gradient norm of model is nan; optimizer step skipped" in buffer.getvalue()
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert ["skipped_steps" in r for r in records] == [False, True, True, True]
    assert records[-1]["skipped_steps"] == 1
    state = load_trainer_state(latest_checkpoint(tmp_path / "nan"))
    assert state["format"] == 2
    assert state["optimizer_steps"]["model"] == {"skipped_steps": 1, "consecutive_skipped": 0}
    assert set(state["optimizer"]) == set(state["scheduler"]) == {"model"}


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path):
    trainer = NaNAtStep(
        config(tmp_path, "nans", "max_steps=10", "optim.max_consecutive_skipped_steps=1"),
        Regressor(),
        regression_rows(),
    )
    trainer.poisoned_steps = (2, 3)
    with pytest.raises(TrainingDivergedError, match="max_consecutive_skipped_steps=1"):
        trainer.train()


def test_a_format_1_checkpoint_resumes_and_an_unknown_format_is_refused(tmp_path):
    class Plain(NaNAtStep):
        pass

    Plain(config(tmp_path, "old", "max_steps=2"), Regressor(), regression_rows()).train()
    path = latest_checkpoint(tmp_path / "old") / TRAINER_STATE_FILE
    state = torch.load(path, weights_only=True)
    for key in ("optimizer_steps", "extra"):
        del state[key]
    old = state | {
        "format": 1,
        "optimizer": state["optimizer"]["model"],
        "scheduler": state["scheduler"]["model"],
    }
    torch.save(old, path)
    resume = config(tmp_path, "old", "max_steps=3", f"resume_from={tmp_path / 'old'}")
    assert Plain(resume, Regressor(), regression_rows()).train()["step"] == 3

    torch.save(old | {"format": 99}, latest_checkpoint(tmp_path / "old") / TRAINER_STATE_FILE)
    resume = config(tmp_path, "old", "max_steps=4", f"resume_from={tmp_path / 'old'}")
    with pytest.raises(CheckpointError, match="trainer state format 99"):
        Plain(resume, Regressor(), regression_rows()).train()


# --------------------------------------------------------------------------------------
# SFT on ragged completions: 8 rows in one micro-batch = 4 x 2 = 2 x 4
# --------------------------------------------------------------------------------------


def ragged_sft_rows() -> list[dict[str, list[int]]]:
    """8 rows; completions of 1 to 14 tokens after prompts of 2 to 5."""
    generator = torch.Generator().manual_seed(3)
    rows = []
    for prompt_length, completion_length in zip(
        [2, 5, 3, 4, 2, 3, 5, 4], [1, 14, 2, 9, 3, 12, 1, 6], strict=True
    ):
        ids = torch.randint(1, 64, (prompt_length + completion_length,), generator=generator)
        labels = ids.clone()
        labels[:prompt_length] = IGNORE_INDEX
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


class GradientSpy(SFTTrainer):
    """Keeps the gradient the optimizer is about to apply."""

    def on_train_begin(self) -> None:
        optimizer = self.optimizer_step._torch_optimizer  # what one CPU process steps
        apply = optimizer.step

        def step(*args, **kwargs):
            self.grads = [p.grad.detach().clone() for p in self.unwrapped_model.parameters()]
            return apply(*args, **kwargs)

        optimizer.step = step


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_sft_step_gradient_does_not_depend_on_the_micro_batch_split(tmp_path):
    rows = ragged_sft_rows()
    collate = SFTCollator(pad_token_id=0)
    runs = {}
    for per_device, accumulation in ((8, 1), (4, 2), (2, 4)):
        name = f"split-{per_device}x{accumulation}"
        cfg = config(
            tmp_path,
            name,
            "max_steps=1",
            f"examples_per_device={per_device}",
            f"grad_accum_steps={accumulation}",
            "optim.max_grad_norm=null",
        )
        trainer = GradientSpy(cfg, tiny_llama(tie_word_embeddings=False), rows, collate_fn=collate)
        trainer.train()
        runs[name] = (trainer.grads, read_metrics(tmp_path / name / "metrics.jsonl")[0]["loss"])

    # The exact objective: mean NLL over all completion tokens of the step.
    model = tiny_llama(tie_word_embeddings=False)
    batch = collate(rows)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    scored = targets != IGNORE_INDEX
    loss = nll[scored].sum() / scored.sum()
    loss.backward()
    expected = [p.grad for p in model.parameters()]
    for grads, logged in runs.values():
        assert logged == pytest.approx(loss.item(), rel=1e-5)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The mean of per-micro-batch means (the old normalisation) is another loss on these rows.
    old = sum(
        (nll[i : i + 2] * scored[i : i + 2]).sum() / scored[i : i + 2].sum() for i in (0, 2, 4, 6)
    )
    # (by more than 100x the tolerance the three splits meet).
    assert abs(old.item() / 4 - loss.item()) > 1e-3 * loss.item()


# --------------------------------------------------------------------------------------
# Two processes (DDP over gloo) with ragged units
# --------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_two_processes_equal_one_on_ragged_units(tmp_path):
    from safetensors.torch import load_file

    # "two" is launched; the one-process references run here.
    launched = accelerate_launch(LAUNCHED_OPTIMIZE, str(tmp_path), root=tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    output = f"output_dir={tmp_path}"
    launched_optimize.train(output, "run_name=accum", "examples_per_device=4", "grad_accum_steps=2")
    launched_optimize.train(output, "run_name=whole", "examples_per_device=8")
    curves, weights = {}, {}
    for name in ("two", "accum", "whole"):
        curves[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
        final = latest_checkpoint(tmp_path / name) / "model" / "model.safetensors"
        weights[name] = load_file(final)
    assert len(curves["whole"]) == 8  # 32 rows, 8 per step, 2 epochs
    assert curves["whole"][-1] < 0.5 * curves["whole"][0]
    for name in ("two", "accum"):
        assert curves[name] == pytest.approx(curves["whole"], rel=1e-5), name
        for key, value in weights["whole"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-5, atol=1e-6)
