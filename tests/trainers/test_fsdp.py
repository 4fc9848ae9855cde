"""Training and checkpoints under FSDP.

Pins down: two processes sharded by FSDP (version 2, over gloo) train a tiny Llama to the loss
curve of the same batches unsharded; a run killed after its step-4 checkpoint resumes to the
uninterrupted run's metrics; the checkpoint holds the full optimizer state keyed by parameter
name and a model that ``AutoModelForCausalLM.from_pretrained`` loads with the FSDP model's
gathered weights and logits. The same save and load functions, in one process on a one-process
FSDP mesh, round-trip a causal LM with its optimizer and a reward model exactly; the optimizer
state saved under FSDP loads without it, the reverse is refused; and ``accelerate launch
--use_fsdp`` on CPU processes, which accelerate 1.15 would quietly run as DDP, is refused.

The two-process runs are made by one launch of ``launched_fsdp.py`` (how it gets FSDP on CPU
processes is told there).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import launched_fsdp
import pytest
import torch
from accelerate.utils import DistributedType
from counting_llama import counting_sequences, probe_ids, tiny_llama
from launch_helpers import accelerate_launch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from alignkit.config import OptimConfig, TrainConfig, load_config
from alignkit.errors import CheckpointError, ConfigError
from alignkit.runloop import OptimizerStep
from alignkit.runloop.optimizer import build_lr_scheduler, build_optimizer, is_keyed_by_name
from alignkit.runloop.runtime import make_accelerator
from alignkit.tracking import load_trainer_state, read_metrics
from alignkit.tracking.checkpoint import load_model_weights, save_model_weights

LAUNCHED_FSDP = Path(launched_fsdp.__file__)
#: `accelerate launch`'s FSDP flags: version 2, one unit per decoder layer, full state dicts.
FSDP_FLAGS = (
    "--use_fsdp",
    "--fsdp_version",
    "2",
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap",
    "LlamaDecoderLayer",
    "--fsdp_state_dict_type",
    "FULL_STATE_DICT",
)


@pytest.mark.multiprocess
def test_fsdp_matches_unsharded_training_resumes_exactly_and_saves_a_hugging_face_model(tmp_path):
    from transformers import AutoModelForCausalLM

    # One launch makes the FSDP runs: "fsdp", "cut" killed in step 7, "cut" resumed.
    launched = accelerate_launch(LAUNCHED_FSDP, str(tmp_path), root=tmp_path, sharding=FSDP_FLAGS)
    assert launched.returncode == 0, launched.stderr[-3000:]
    setup = read_json(tmp_path / "fsdp" / "setup.json")
    assert setup["distributed_type"] == "DistributedType.FSDP"
    assert setup["model_class"] == "FSDPLlamaForCausalLM"  # torch's fully_shard
    assert setup["param_class"] == "DTensor"
    assert setup["local_elements"] == setup["elements"] // 2  # each process holds half
    records = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 10))
    assert records[-1]["loss"] < records[0]["loss"] - 0.3

    # Sharding changes where the parameters live, not the update: the curve of the same
    # batches unsharded (one process accumulating both halves of each step, which DDP matches
    # in test_loop.py) up to float summation order.
    launched_fsdp.train(f"output_dir={tmp_path}", "run_name=unsharded", "grad_accum_steps=2")
    unsharded = read_metrics(tmp_path / "unsharded" / "metrics.jsonl")
    for name in ("loss", "grad_norm"):
        assert [r[name] for r in records] == pytest.approx([r[name] for r in unsharded], rel=1e-5)

    # The checkpoint holds the full optimizer state, keyed by parameter name.
    optimizer = load_trainer_state(tmp_path / "fsdp" / "checkpoints" / "step-8")["optimizer"]
    assert is_keyed_by_name(optimizer["model"])
    moments = optimizer["model"]["state"]["model.embed_tokens.weight"]
    assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == (64, 32)  # full, not 32
    assert float(moments["step"]) == 8.0
    assert len(optimizer["model"]["state"]) == 20  # every parameter; lm_head is tied

    # Killed in step 7: the newest checkpoint was step 4, in the middle of the first epoch.
    at_kill = read_json(tmp_path / "cut-at-kill.json")
    assert at_kill == {"latest_checkpoint": "step-4", "logged_steps": list(range(1, 7))}
    got = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 10))
    # Same processes, same reduction order: the resumed curve is the uninterrupted one.
    for name in ("loss", "grad_norm", "lr"):
        assert [r[name] for r in got] == pytest.approx([r[name] for r in records], rel=1e-6)

    # The final checkpoint is an ordinary Hugging Face model: the gathered weights, exactly,
    # and the FSDP model's logits.
    final = tmp_path / "fsdp" / "checkpoints" / "step-9" / "model"
    assert read_json(final / "config.json")["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(final).eval()
    trained = torch.load(tmp_path / "fsdp" / "final_model.pt", weights_only=True)
    assert set(reloaded.state_dict()) == set(trained["weights"])
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trained["weights"][name]), name
    with torch.no_grad():
        logits = reloaded(input_ids=probe_ids()).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=1e-5, atol=1e-5)


def read_json(path: Path):
    import json

    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------
# The save and load functions in one process (a one-process FSDP mesh over gloo)
# --------------------------------------------------------------------------------------


def _tiny_llama():
    return tiny_llama(), counting_sequences()  # the model the launched script trains


def _trained_steps(model, optimizer, rows, steps: int = 2) -> None:
    batch = {key: torch.stack([row[key] for row in rows[:4]]) for key in rows[0]}
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _through_a_file(state: dict, tmp_path: Path) -> dict:
    """`state` as a resume reads it: no tensor shared with the optimizer it came from."""
    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


def _groups(optimizer_state: dict) -> list[dict]:
    """Param groups with betas as a tuple (a loaded state may hold the config's list)."""
    return [{**g, "betas": tuple(g["betas"])} for g in optimizer_state["param_groups"]]


def _sharded_step(model, optimizer) -> OptimizerStep:
    """An OptimizerStep that sees FSDP (only the accelerator's distributed type is read)."""
    scheduler = build_lr_scheduler(optimizer, OptimConfig(lr=1e-2), total_steps=10)
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP)
    return OptimizerStep(accelerator, model, optimizer, scheduler, max_grad_norm=None)


def _fully_shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
        fully_shard(layer)
    fully_shard(model)
    return model


def test_fsdp_optimizer_and_weights_round_trip_in_one_process(single_process_group, tmp_path):
    model, rows = _tiny_llama()
    _fully_shard(model)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    _trained_steps(model, optimizer, rows)
    saved = _through_a_file(_sharded_step(model, optimizer).state_dict(), tmp_path)
    assert is_keyed_by_name(saved["optimizer"])
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    save_model_weights(model, tmp_path / "model", state_dict=weights)

    fresh, _ = _tiny_llama()
    torch.manual_seed(1)
    for parameter in fresh.parameters():  # other weights than the saved ones
        torch.nn.init.normal_(parameter)
    _fully_shard(fresh)
    fresh_optimizer = build_optimizer(fresh, OptimConfig(lr=1e-2))
    load_model_weights(fresh, tmp_path / "model")  # the tied lm_head is not in the file
    restored = _sharded_step(fresh, fresh_optimizer)
    restored.load_state_dict(saved)

    again = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True))
    assert set(again) == set(weights)
    for name, value in weights.items():
        assert torch.equal(again[name], value), name
    reloaded = restored.state_dict()["optimizer"]
    assert _groups(reloaded) == _groups(saved["optimizer"])
    for name, moments in saved["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(reloaded["state"][name][key], value), (name, key)
    # And the restored pair trains on exactly as the original.
    _trained_steps(model, optimizer, rows, steps=1)
    _trained_steps(fresh, fresh_optimizer, rows, steps=1)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name


def test_a_reward_model_saved_under_fsdp_loads_plainly_and_back_into_shards(
    single_process_group, tmp_path
):
    """A RewardModel is saved as backbone + heads files: from the gathered weights too."""
    from alignkit.models import load_reward_model
    from alignkit.trainers.reward import load_reward_checkpoint

    model = _fully_shard(load_reward_model("tiny", aux_heads=["safety"], seed=0)[0])
    assert isinstance(next(model.parameters()), torch.distributed.tensor.DTensor)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    save_model_weights(model, tmp_path / "rm", state_dict=weights)

    plain, _ = load_reward_model(tmp_path / "rm")
    assert plain.reward_config.aux_heads == ("safety",)
    assert set(plain.state_dict()) == set(weights)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, weights[name]), name

    other = _fully_shard(load_reward_model("tiny", aux_heads=["safety"], seed=1)[0])
    before = get_model_state_dict(other, options=StateDictOptions(full_state_dict=True))
    assert not torch.equal(before["head.weight"], weights["head.weight"])
    load_reward_checkpoint(other, tmp_path / "rm")
    after = get_model_state_dict(other, options=StateDictOptions(full_state_dict=True))
    for name, value in weights.items():
        assert torch.equal(after[name], value), name


def test_an_fsdp_optimizer_state_resumes_without_fsdp(tmp_path):
    """Keyed by parameter name, the full state loads into an unsharded model too."""
    model, rows = _tiny_llama()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    _trained_steps(model, optimizer, rows)
    by_name = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True)
    )
    by_name = _through_a_file(by_name, tmp_path)
    fresh, _ = _tiny_llama()
    fresh_optimizer = build_optimizer(fresh, OptimConfig(lr=1e-2))
    cfg = load_config(TrainConfig, None, [f"output_dir={tmp_path}", "run_name=plain"])
    step = OptimizerStep(
        make_accelerator(cfg, precision="fp32"),
        fresh,
        fresh_optimizer,
        build_lr_scheduler(fresh_optimizer, cfg.optim, total_steps=10),
        max_grad_norm=None,
    )
    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps=10).state_dict()
    step.load_state_dict({"optimizer": by_name, "scheduler": scheduler})
    want, have = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert _groups(want) == _groups(have)
    assert set(have["state"]) == set(range(20))
    for index, moments in want["state"].items():
        for key, value in moments.items():
            assert torch.equal(have["state"][index][key], value), (index, key)


def test_an_optimizer_state_saved_without_fsdp_is_refused_under_fsdp():
    model, _ = _tiny_llama()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    step = _sharded_step(model, optimizer)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": step.scheduler.state_dict()}
    assert not is_keyed_by_name(saved["optimizer"])
    with pytest.raises(CheckpointError, match=r"was saved without FSDP .* resume it without FSDP"):
        step.load_state_dict(saved)


def test_fsdp_on_cpu_processes_is_refused_not_run_as_ddp(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = load_config(TrainConfig, None, [f"output_dir={tmp_path}", "run_name=x"])
    message = r"--use_fsdp on CPU processes: accelerate 1.15 shards with FSDP only on GPUs"
    with pytest.raises(ConfigError, match=message):
        make_accelerator(cfg, precision="fp32")
