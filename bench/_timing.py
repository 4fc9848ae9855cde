"""Per-step clock shared by the SFT and reward-model workers (bench/_sft_worker.py, _rm_worker.py).

Each framework's hook calls :meth:`StepCounter.count` with what one forward pass processed
(examples, non-pad tokens, tokens whose log-prob enters the loss) and :meth:`StepCounter.step_end`
right after the optimizer step. :func:`window_result` turns that into the throughput of the
window from the end of step ``warmup_steps`` to the end of the last step.
"""

from __future__ import annotations

import resource
import time
from typing import Any

COUNTS = ("examples", "tokens", "scored")


class StepCounter:
    """Step end times (wall and process CPU), per-step counts and losses."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        # Kernel time and page faults (``getrusage``): a minor fault costs ~10 us on the bench VM.
        self.sys_ends: list[float] = []
        self.fault_ends: list[int] = []
        self.steps: list[dict[str, int]] = []
        self.losses: list[Any] = []  # 0-dim tensors, converted once training is over
        self._pending = dict.fromkeys(COUNTS, 0)
        self.torch_threads: int | None = None

    def count(self, examples: Any, tokens: Any, scored: Any = 0) -> None:
        for key, value in zip(COUNTS, (examples, tokens, scored), strict=True):
            self._pending[key] += int(value)

    def step_end(self, loss: Any) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.sys_ends.append(usage.ru_stime)
        self.fault_ends.append(usage.ru_minflt + usage.ru_majflt)
        self.steps.append(self._pending)
        self._pending = dict.fromkeys(COUNTS, 0)
        self.losses.append(loss.detach() if hasattr(loss, "detach") else loss)
        if self.torch_threads is None:
            import torch

            self.torch_threads = torch.get_num_threads()


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def window_result(counter: StepCounter, warmup_steps: int) -> dict[str, Any]:
    """Throughput over steps ``warmup_steps+1 ..`` and the epoch totals."""
    if len(counter.ends) <= warmup_steps:
        raise SystemExit(f"only {len(counter.ends)} steps ran; need more than {warmup_steps}")
    window_s = counter.ends[-1] - counter.ends[warmup_steps - 1]
    window_cpu_s = counter.cpu_ends[-1] - counter.cpu_ends[warmup_steps - 1]
    window = {key: sum(s[key] for s in counter.steps[warmup_steps:]) for key in COUNTS}
    return {
        "steps": len(counter.ends),
        "window_steps": len(counter.ends) - warmup_steps,
        "window_s": window_s,
        "window_cpu_s": window_cpu_s,
        "window_sys_s": counter.sys_ends[-1] - counter.sys_ends[warmup_steps - 1],
        "window_page_faults": counter.fault_ends[-1] - counter.fault_ends[warmup_steps - 1],
        "s_per_step": window_s / (len(counter.ends) - warmup_steps),
        **{f"window_{key}": value for key, value in window.items()},
        "samples_per_s": window["examples"] / window_s,
        "samples_per_cpu_s": window["examples"] / window_cpu_s,
        "tokens_per_s": window["tokens"] / window_s,
        "run_totals": {key: sum(s[key] for s in counter.steps) for key in COUNTS},
        "torch_threads_in_training": counter.torch_threads,
        "losses": [float(x) for x in counter.losses],
    }
