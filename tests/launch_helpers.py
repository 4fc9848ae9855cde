"""Launching a test's script as several processes under ``accelerate launch`` (DDP over gloo on
CPU, or FSDP with the flags a test adds).

Each launched process imports torch, transformers and accelerate afresh (seconds of CPU), so a
test file launches once and has its script run every multi-process check it needs (see the
``launched_*.py`` scripts next to the trainer tests); one-process references run in the test's
own process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

#: The checkout's sources, put first on the launched processes' path (then this folder, so
#: that a launched script can call :func:`end_launched_process`).
SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port nobody listens on now (a launcher's rendezvous, a server a test starts, or an
    address where nothing answers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(
    *target: str | Path,
    root: Path,
    processes: int = 2,
    sharding: Sequence[str] = ("--multi_gpu",),
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``accelerate launch <sharding> --num_processes <processes> *target`` on CPU: ``target``
    is a script and its arguments, or ``"-m", "alignkit", "train", ...``.

    `root` holds the launcher's HF_HOME, so no user accelerate config applies. `sharding` is
    ``--multi_gpu`` for DDP: ``accelerate launch --cpu --num_processes 2`` starts one process
    unless an mpirun hostfile is given, while torchrun-style launching with ACCELERATE_USE_CPU
    gives DDP on gloo.
    """
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *sharding,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *map(str, target),
    ]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(root / "hf_home"),
        "ACCELERATE_USE_CPU": "true",
    }
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


class SimulatedKill(Exception):
    """Raised by a test's trainer in the step a killed process would die in."""


def record_the_killed_run(run_dir: Path, record: Path) -> None:
    """In a launched script, between a run killed by :class:`SimulatedKill` and its resumption:
    the main process writes to `record` (JSON) the newest checkpoint's name and the logged steps
    of the run in `run_dir`, before any process resumes it (every process calls)."""
    import torch.distributed as dist

    from alignkit.tracking import latest_checkpoint, read_metrics

    if dist.get_rank() == 0:
        left = {
            "latest_checkpoint": latest_checkpoint(run_dir).name,
            "logged_steps": [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")],
        }
        record.write_text(json.dumps(left))
    dist.barrier()


def end_launched_process() -> NoReturn:
    """The end of a launched script: leave the gloo group together (as ``alignkit train``
    does, not at interpreter exit), then exit 0 without the interpreter's teardown of torch,
    transformers and accelerate (3-5 s a process on two busy cores). Everything the script
    wrote is closed by then; an exception before this call exits as usual, with its traceback.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
