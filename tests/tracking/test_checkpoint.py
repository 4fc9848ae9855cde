"""Atomic checkpoints: complete or absent, pruned, reloadable; RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from alignkit.errors import CheckpointError
from alignkit.tracking import (
    TRAINER_STATE_FILE,
    RunDir,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)


class TiedNet(nn.Module):
    """Embedding and output layer share one matrix, as tied language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.LayerNorm(4)


class ExplodingSave(nn.Module):
    """A model whose save dies half-way, like a process killed mid-write."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def save_pretrained(self, directory, **kwargs):
        (directory / "part.bin").write_bytes(b"half")
        raise KeyboardInterrupt


def save(run_dir, step, model=None, keep_last=None, state=None):
    return save_checkpoint(
        run_dir,
        step,
        {"model": model or TiedNet()},
        None,
        state if state is not None else {"step": step},
        keep_last=keep_last,
    )


def test_checkpoint_is_written_under_step_name_with_trainer_state(tmp_path):
    path = save(tmp_path, 3)
    assert path == RunDir(tmp_path).checkpoint_dir(3)
    assert (path / TRAINER_STATE_FILE).is_file()
    assert (path / "model" / "model.safetensors").is_file()
    assert load_trainer_state(path) == {"step": 3}
    assert latest_checkpoint(tmp_path) == path


def test_tokenizer_is_saved_next_to_each_model(tmp_path):
    class Tokenizer:
        def save_pretrained(self, directory):
            (directory / "tokenizer.json").write_text("{}")

    path = save_checkpoint(
        tmp_path, 1, {"policy": TiedNet(), "value": TiedNet()}, Tokenizer(), {"step": 1}
    )
    assert (path / "policy" / "tokenizer.json").is_file()
    assert (path / "value" / "tokenizer.json").is_file()


def test_crash_during_save_leaves_no_checkpoint_and_no_temp_dir(tmp_path):
    save(tmp_path, 1)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model=ExplodingSave())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]
    assert latest_checkpoint(tmp_path).name == "step-1"


def test_latest_checkpoint_ignores_temporary_and_incomplete_dirs(tmp_path):
    save(tmp_path, 4)
    checkpoints = tmp_path / "checkpoints"
    killed = checkpoints / ".tmp-step-8-abc"  # what a SIGKILL during save leaves
    (killed / "model").mkdir(parents=True)
    (killed / TRAINER_STATE_FILE).write_bytes(b"")
    (checkpoints / "step-9" / "model").mkdir(parents=True)  # copied by hand, no state
    (checkpoints / "notes").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-4"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4"]
    save(tmp_path, 5)  # the next save clears the crashed temp dir
    assert not killed.exists()


def test_latest_checkpoint_orders_by_step_number_not_name(tmp_path):
    for step in (9, 10, 100):
        save(tmp_path, step)
    assert latest_checkpoint(tmp_path).name == "step-100"
    assert latest_checkpoint(tmp_path / "no-such-run") is None


def test_keep_last_prunes_oldest(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-6", "step-8"]
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["step-6"]


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 5, state={"version": 1})
    save(tmp_path, 5, state={"version": 2})
    assert load_trainer_state(latest_checkpoint(tmp_path)) == {"version": 2}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-5"]


def test_weights_round_trip_with_tied_parameters(tmp_path):
    torch.manual_seed(0)
    source = TiedNet()
    path = save(tmp_path, 1, model=source)
    torch.manual_seed(1)
    target = TiedNet()
    load_model_weights(target, path / "model")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert target.head.weight is target.embed.weight


def test_loading_weights_of_another_model_fails_clearly(tmp_path):
    path = save(tmp_path, 1, model=TiedNet())
    with pytest.raises(CheckpointError, match="weights not in the model"):
        load_model_weights(nn.Linear(4, 4), path / "model")

    class Bigger(TiedNet):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match=r"weights missing: extra\.weight"):
        load_model_weights(Bigger(), path / "model")
    with pytest.raises(CheckpointError, match=r"no \.safetensors"):
        load_model_weights(TiedNet(), tmp_path)


def test_trainer_state_keeps_numpy_values_loadable_safely(tmp_path):
    state = {"controller": {"ema": np.float32(0.5), "history": np.arange(3)}, "steps": 3}
    loaded = load_trainer_state(save(tmp_path, 1, state=state))
    assert loaded["controller"]["ema"] == 0.5
    assert torch.equal(loaded["controller"]["history"], torch.arange(3))


def test_incomplete_checkpoint_cannot_be_loaded(tmp_path):
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_trainer_state(tmp_path)


def test_rng_state_round_trip_reproduces_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.standard_normal()  # leave a cached Gaussian in NumPy's state
    captured = capture_rng_state()
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    path = save(tmp_path, 1, state={"rng": captured})
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_trainer_state(path)["rng"])
    again = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert again[0] == expected[0]
    assert again[1] == expected[1]
    assert torch.equal(again[2], expected[2])
