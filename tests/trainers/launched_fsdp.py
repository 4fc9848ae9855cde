"""test_fsdp.py's two-process runs, made by one ``accelerate launch --use_fsdp --fsdp_version 2``
of this script.

accelerate 1.15 enables FSDP only on GPUs and other accelerators, while torch's FSDP2
(``fully_shard``) runs on CPU processes over gloo. So the script switches accelerate's
process-wide state from DDP (MULTI_CPU) to FSDP before a trainer is built
(:func:`force_fsdp_on_cpu`): everything after that, accelerate's ``fully_shard`` preparation
and alignkit's save and restore, is the code that runs on GPUs.

``launched_fsdp.py OUTPUT_DIR`` trains, one run after the other in the same two processes, a
tiny Llama on the counting task for 9 steps (48 rows, 2 x 4 per step: 6 steps an epoch, so a
run crosses one): ``fsdp``, whose trained model it also records (``final_model.pt``: logits on a
probe and weights gathered by torch, not by alignkit's checkpoint code; ``setup.json``: how it
is sharded); ``cut``, the same run killed in step 7 (after its step-4 checkpoint); and ``cut``
resumed from other weights and RNG states. The test runs the unsharded reference with
:func:`train` in its own process.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from counting_llama import counting_sequences, probe_ids, tiny_llama
from launch_helpers import SimulatedKill, end_launched_process, record_the_killed_run
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from alignkit.config import TrainConfig, load_config
from alignkit.trainers import Trainer

SETTINGS = (
    "examples_per_device=4",
    "max_steps=9",
    "logging.every=1",
    "checkpoint.every=4",
    "optim.lr=3e-3",
    "logging.progress_bar=false",
    "logging.plots=false",
)


class LMTrainer(Trainer):
    kill_at_step = 0

    def compute_loss(self, model, batch):
        if self.state.step + 1 == self.kill_at_step:
            raise SimulatedKill  # on every process, before the step's first collective
        return model(**batch).loss, {}


def force_fsdp_on_cpu() -> None:
    """Turn accelerate's DDP-on-CPU state into FSDP (what ``--use_fsdp`` gives on GPUs), with
    the FSDP plugin accelerate builds from ``accelerate launch``'s FSDP flags."""
    state = Accelerator().state
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    PartialState().distributed_type = DistributedType.FSDP  # copied into AcceleratorState
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* flags


def train(*overrides: str, kill_at_step: int = 0) -> LMTrainer:
    """One run: SETTINGS then `overrides`, from :func:`tiny_llama`'s weights."""
    config = load_config(TrainConfig, None, [*SETTINGS, *overrides])
    trainer = LMTrainer(config, tiny_llama(), counting_sequences())
    trainer.kill_at_step = kill_at_step
    trainer.train()
    return trainer


def record_the_trained_model(trainer: LMTrainer, out: Path) -> None:
    """What the trained model is, seen from the processes: its logits on a probe, its weights
    gathered by torch and how it is sharded."""
    model = trainer.model
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits
    weights = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    first = next(model.parameters())
    if trainer.accelerator.is_main_process:
        torch.save({"logits": logits, "weights": weights}, out / "final_model.pt")
        setup = {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "model_class": type(model).__name__,
            "param_class": type(first).__name__,
            "local_elements": (first.to_local() if isinstance(first, DTensor) else first).numel(),
            "elements": first.numel(),
        }
        (out / "setup.json").write_text(json.dumps(setup))


def main(output_dir: Path) -> None:
    force_fsdp_on_cpu()
    whole = train(f"output_dir={output_dir}", "run_name=fsdp")
    record_the_trained_model(whole, output_dir / "fsdp")
    rank = whole.accelerator.process_index
    del whole
    cut = output_dir / "cut"
    with contextlib.suppress(SimulatedKill):
        train(f"output_dir={output_dir}", "run_name=cut", kill_at_step=7)
    record_the_killed_run(cut, output_dir / "cut-at-kill.json")
    # The resumed run starts from other weights and RNG states on each process: the
    # checkpoint must restore them all (each process holds its shard of its own weights).
    resumed = (f"output_dir={output_dir}", "run_name=cut", f"resume_from={cut}")
    config = load_config(TrainConfig, None, [*SETTINGS, *resumed])
    model = tiny_llama()
    torch.manual_seed(123 + rank)  # after tiny_llama's own seeding
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    LMTrainer(config, model, counting_sequences()).train()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_launched_process()
