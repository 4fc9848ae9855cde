"""What every benchmark against TRL shares, on the driver's side and the worker's side.

Driver (``compare_trl.py`` and its case modules): :func:`machine` facts for the result JSON;
:func:`run_worker`, one worker script in a fresh process (:func:`worker_env`: thread counts,
offline, alignkit importable, fresh caches) with the load average around it;
:func:`alternating_runs`, the settings in turn, the order rotating every repeat; :func:`spread`,
:func:`medians`, :func:`cell` and :func:`print_table` for median [min-max] summaries;
:func:`write_report` for the JSON.

Worker (``_*_worker.py``, one framework per process so that peak RSS is its own):
:func:`worker_parser` and :func:`worker_main` (common options, thread variables set before torch
is imported, the result as JSON); :class:`StepCounter` and :func:`window_result` (a per-step
clock, fed by the hooks of ``_frameworks.py``, and the throughput after the warm-up steps);
:func:`timed_training` (build and train, timed, under :func:`profiled`) and, for the online
workers, :func:`run_setting`. How each framework is set up alike in every worker (the settings
its runs share, the clock's hooks in its trainer) is ``_frameworks.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
#: What a run computes in: ``fp32``, or ``bf16`` autocast with fp32 master weights (both
#: frameworks alike: alignkit ``precision: bf16``, TRL ``bf16=True``).
PRECISIONS = ("fp32", "bf16")

# ----------------------------------------------------------------------------- driver


def machine(threads: list[int]) -> dict[str, Any]:
    """CPU, cores, thread setting, OS and library versions."""
    cpu, flags = platform.processor() or "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    versions = {}
    for package in ("alignkit", "torch", "transformers", "accelerate", "datasets", "trl"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = __import__(package).__version__
    return {
        "cpu": cpu,
        # Which matmul kernels the CPU can use; they decide most of a step's time.
        "simd": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def worker_env(threads: int, scratch: Path) -> dict[str, str]:
    """Environment of a worker: thread counts, offline, alignkit importable, fresh caches."""
    import alignkit

    env = dict(os.environ)
    src = str(Path(alignkit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(scratch / "hf-datasets"),
        TQDM_DISABLE="1",
    )
    return env


def run_worker(
    worker: str,
    setting: str,
    options: dict[str, Any],
    *,
    threads: int,
    scratch: Path,
    env: dict[str, str] | None = None,
    python_path: Sequence[Path] = (),
) -> dict[str, Any]:
    """One run of ``bench/<worker>`` in a fresh process, given ``--name=value`` per option,
    ``--threads``, ``--work-dir`` (new, under ``scratch``) and ``--result``, in :func:`worker_env`
    updated with ``env``, ``python_path`` first; its result with the process' wall time and the
    load averages before and after it."""
    work = Path(tempfile.mkdtemp(prefix=f"{setting}-", dir=scratch))
    result_path = work / "result.json"
    command = [sys.executable, str(BENCH_DIR / worker)]
    command += [f"--{name}={value}" for name, value in options.items()]
    command += [f"--threads={threads}", f"--work-dir={work}", f"--result={result_path}"]
    process_env = {**worker_env(threads, scratch), **(env or {})}
    if python_path:
        process_env["PYTHONPATH"] = os.pathsep.join(
            [*map(str, python_path), process_env["PYTHONPATH"]]
        )
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    done = subprocess.run(command, env=process_env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{setting} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["process_wall_s"] = wall
    result["loadavg_before"] = load_before
    result["loadavg_after"] = list(os.getloadavg())
    return result


def alternating_runs(
    settings: Sequence[str],
    repeats: int,
    run_one: Callable[[str], dict[str, Any]],
    line: Callable[[dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """``run_one(setting)`` for every setting in every repeat, the order rotating by one each
    repeat (so that no setting always runs first or after the same one); each result is marked
    with its ``repeat`` and printed as ``line(result)`` as soon as it is in."""
    runs = []
    for repeat in range(repeats):
        shift = repeat % len(settings)
        for setting in (*settings[shift:], *settings[:shift]):
            run = run_one(setting)
            run["repeat"] = repeat
            runs.append(run)
            print(line(run), flush=True)
    return runs


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def medians(
    runs: list[dict[str, Any]],
    settings: Sequence[str],
    keys: Sequence[str],
    *,
    counted: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per setting that has runs: the :func:`spread` over its runs of each of ``keys`` that its
    runs hold, and with ``counted`` the number of runs."""
    out: dict[str, dict[str, Any]] = {}
    for setting in settings:
        mine = [r for r in runs if r["framework"] == setting]
        if mine:
            out[setting] = {k: spread([r[k] for r in mine]) for k in keys if k in mine[0]}
            if counted:
                out[setting]["runs"] = len(mine)
    return out


def cell(stat: dict[str, float], digits: int, scale: float = 1.0) -> str:
    """``median [min-max]`` of a :func:`spread`, scaled, to ``digits`` decimals."""
    lo, mid, hi = (stat[k] * scale for k in ("min", "median", "max"))
    return f"{mid:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def print_table(
    by_setting: dict[str, dict[str, Any]],
    columns: Sequence[tuple],
    *,
    setting_width: int,
    column_width: int,
    out: Any = sys.stdout,
) -> None:
    """One line per setting, a :func:`cell` per column ``(title, key, digits[, scale])``."""
    print(
        f"{'setting':<{setting_width}}" + "".join(f"{c[0]:>{column_width}}" for c in columns),
        file=out,
    )
    for setting, stats in by_setting.items():
        cells = "".join(f"{cell(stats[c[1]], *c[2:]):>{column_width}}" for c in columns)
        print(f"{setting:<{setting_width}}{cells}", file=out)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The result JSON (one-space indent, the layout of bench/results/*.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- worker


def worker_parser(
    description: str,
    settings: Sequence[str],
    *,
    setting_option: str = "setting",
    online: bool = False,
) -> argparse.ArgumentParser:
    """A worker's argument parser with the options every worker takes: ``--<setting_option>``
    (one of ``settings``, read as ``args.setting``), ``--model-dir``, ``--work-dir``,
    ``--result``, ``--threads``, ``--seed``, ``--lr``, ``--precision``; an offline worker's ``--warmup-steps``
    (steps left out of timing) and ``--cprofile`` / ``--torch-profile`` (:func:`profiled`), or
    an ``online`` worker's ``--prompts``, ``--steps`` and ``--max-new-tokens``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(f"--{setting_option}", dest="setting", choices=settings, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True, help="scratch (run dirs)")
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, or bf16 autocast over fp32 weights in both frameworks (TRL bf16=True)",
    )
    if online:
        parser.add_argument("--prompts", type=Path, required=True)
        parser.add_argument("--steps", type=int, default=20)
        parser.add_argument("--max-new-tokens", type=int, default=16)
    else:
        parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of timing")
        parser.add_argument("--cprofile", type=Path, default=None, help="dump cProfile of train()")
        parser.add_argument(
            "--torch-profile",
            type=Path,
            default=None,
            help="write torch.profiler op table of train()",
        )
    return parser


def worker_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    argv: list[str] | None = None,
) -> int:
    """Parse, set the thread variables before torch is imported (intra-op pools size
    themselves from them at start-up), run and write the result as JSON to ``--result``."""
    args = parser.parse_args(argv)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result = run(args)
    args.result.write_text(json.dumps(result), encoding="utf-8")
    return 0


COUNTS = ("examples", "tokens", "scored")


class StepCounter:
    """Step end times (wall and process CPU), per-step counts and losses.

    Each framework's hook calls :meth:`count` with what one forward pass processed (examples,
    non-pad tokens, tokens whose log-prob enters the loss) and :meth:`step_end` right after the
    optimizer step.
    """

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

    def per_step(self) -> dict[str, list[float]]:
        """Each step's wall seconds, kernel seconds and page faults (from the second step on)."""
        return {
            "step_s": [b - a for a, b in itertools.pairwise(self.ends)],
            "step_sys_s": [b - a for a, b in itertools.pairwise(self.sys_ends)],
            "step_page_faults": [b - a for a, b in itertools.pairwise(self.fault_ends)],
        }


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


@contextmanager
def profiled(args: argparse.Namespace) -> Iterator[None]:
    """cProfile (Python calls) or torch.profiler (operators) around train(), if asked."""
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
    elif args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        args.torch_profile.write_text(table, encoding="utf-8")
    else:
        yield


def run_setting(
    args: argparse.Namespace, runners: dict[str, Callable[[argparse.Namespace], dict[str, Any]]]
) -> dict[str, Any]:
    """The online workers' run: ``runners[args.setting](args)`` in ``args.threads`` torch
    threads, with the setting, the threads seen, peak resident memory and the process' CPU
    seconds added."""
    import torch

    torch.set_num_threads(args.threads)
    result = runners[args.setting](args)
    result["framework"] = args.setting
    result["torch_threads"] = torch.get_num_threads()
    result["peak_rss_mib"] = peak_rss_mib()
    result["cpu_s"] = time.process_time()
    return result


def timed_training(args: argparse.Namespace, build: Callable[[], tuple]) -> tuple[tuple, dict]:
    """Build (``build()`` returns a tuple whose first item is the trainer) and ``train()``, the
    latter under :func:`profiled`, in ``args.threads`` torch threads; returns what ``build``
    returned and what every training worker reports: its setting, threads, build and train
    times, resident memory after the imports and before training, and peak resident memory."""
    import torch

    torch.set_num_threads(args.threads)
    rss_after_imports = rss_mib()
    started = time.perf_counter()
    built = build()
    built_at = time.perf_counter()
    rss_before_train = rss_mib()
    with profiled(args):
        built[0].train()
    finished = time.perf_counter()
    return built, {
        "framework": args.setting,
        "threads": args.threads,
        "build_s": built_at - started,
        "train_call_s": finished - built_at,
        "build_and_train_s": finished - started,
        "rss_after_imports_mib": rss_after_imports,
        "rss_before_train_mib": rss_before_train,
        "peak_rss_mib": peak_rss_mib(),
    }
