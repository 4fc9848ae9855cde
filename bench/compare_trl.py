"""Training speed and memory of alignkit against TRL on the same job.

    python bench/compare_trl.py dpo-tiny [--repeats 3] [--threads 1,2] [--out PATH]
    python bench/compare_trl.py grpo-tiny [--repeats 3] [--steps 20] [--out PATH]
    python bench/compare_trl.py ppo-tiny [--repeats 3] [--steps 20] [--out PATH]
    python bench/compare_trl.py dpo-small [--repeats 3] [--steps 15] [--out PATH]
    python bench/compare_trl.py {sft,rm}-{tiny,small} [--repeats 3] [--settings ..] [--out PATH]

``sft-*`` and ``rm-*`` are described in bench/train_cases.py (model-FLOPs utilisation:
bench/mfu.py); ``grpo-tiny`` in bench/grpo_tiny.py, ``ppo-tiny`` in bench/ppo_tiny.py,
``dpo-small`` (SmolLM2-135M-Instruct, 4 pairs per step, max length 256, against TRL with
precomputed reference log-probs) in bench/dpo_small.py; the rest of this docstring is
``dpo-tiny``.

``dpo-tiny``: DPO (sigmoid, beta 0.1) on the ``tiny`` preset, 512 pairs of the bundled synthetic
task, 8 pairs per step, max length 128, fp32, one epoch (64 optimizer steps), the same seed,
learning rate and initial weights (the tiny model is saved once and loaded by both). Three
settings, each run in a fresh process, alternating (the order rotates every repeat):

- ``alignkit``: alignkit's DPO trainer (reference log-probs computed once before step 1).
- ``trl``: TRL's ``DPOTrainer`` with its reference handling defaults (a reference model
  forward in every step).
- ``trl-precompute``: TRL with ``precompute_ref_log_probs=True``.

Throughput counts steps ``warmup_steps+1 .. 64`` (end of step 3 to the end of training, timed by
a per-step hook in both); tokens are the non-pad tokens (attention mask) of the chosen and
rejected rows, counted the same way in both. Peak RSS is the worker process' ``ru_maxrss``.
The ratio is alignkit's median over the faster TRL setting's median. Results go to
``bench/results/<benchmark>.json``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
WORKER = BENCH_DIR / "_dpo_worker.py"
SETTINGS = ("alignkit", "trl", "trl-precompute")
#: TRL with precomputed reference log-probs in a process whose glibc malloc keeps freed memory
#: as alignkit's trainers do (runloop/allocator.py), set through glibc's environment variables
#: (dpo-small ``--trl-malloc``): what a TRL user gets by exporting them.
TRL_MALLOC = "trl-precompute-malloc"
TRL_MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(2 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
TRL_SETTINGS = ("trl", "trl-precompute", TRL_MALLOC)
ALL_SETTINGS = (*SETTINGS, TRL_MALLOC)
BENCHMARKS = ("dpo-tiny", "grpo-tiny", "ppo-tiny", "dpo-small")
LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- inputs


def synthetic_pairs(n_pairs: int, seed: int) -> tuple[list[dict[str, str]], str]:
    """``n_pairs`` preference rows of the synthetic task's train split, and how they were made.

    The split has 672 pairs, so the first 512 are taken; a smaller split would be cycled
    (deterministically, in order) to reach ``n_pairs``.
    """
    from alignkit.data.synthetic import SyntheticTask

    rows = SyntheticTask(seed=seed).preference_rows("train")
    fields = ("prompt", "chosen", "rejected")
    pairs = [{k: rows[i % len(rows)][k] for k in fields} for i in range(n_pairs)]
    how = (
        f"first {n_pairs} of the {len(rows)} train pairs"
        if len(rows) >= n_pairs
        else f"the {len(rows)} train pairs cycled in order to {n_pairs}"
    )
    return pairs, f"SyntheticTask(seed={seed}).preference_rows('train'): {how}"


def write_inputs(root: Path, n_pairs: int, seed: int) -> dict[str, Any]:
    """Save the tiny model (initialised with `seed`) and the pairs under `root`."""
    from transformers.utils import logging as hf_logging

    from alignkit.models import load_policy

    hf_logging.disable_progress_bar()
    model, tokenizer = load_policy("tiny", dtype="float32", seed=seed)
    model_dir = root / "tiny-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs, source = synthetic_pairs(n_pairs, seed)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return {
        "model_dir": model_dir,
        "data": data,
        "data_source": source,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ----------------------------------------------------------------------------- runs


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
    setting: str, threads: int, inputs: dict[str, Any], args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    """One training run in a fresh process; its result dict plus the load around it."""
    work = Path(tempfile.mkdtemp(prefix=f"{setting}-", dir=scratch))
    result_path = work / "result.json"
    command = [
        sys.executable,
        str(WORKER),
        f"--framework={'trl-precompute' if setting == TRL_MALLOC else setting}",
        f"--model-dir={inputs['model_dir']}",
        f"--data={inputs['data']}",
        f"--work-dir={work}",
        f"--result={result_path}",
        f"--threads={threads}",
        f"--seed={args.seed}",
        f"--lr={args.lr}",
        f"--beta={args.beta}",
        f"--batch-pairs={args.batch_pairs}",
        f"--max-length={args.max_length}",
        f"--warmup-steps={args.warmup_steps}",
    ]
    load_before = os.getloadavg()
    started = time.perf_counter()
    env = worker_env(threads, scratch)
    if setting == TRL_MALLOC:
        env.update(TRL_MALLOC_ENV)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{setting} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["framework"] = setting
    result["process_wall_s"] = wall
    result["loadavg_before"] = list(load_before)
    result["loadavg_after"] = list(os.getloadavg())
    return result


# ----------------------------------------------------------------------------- summary


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


SUMMARISED = (
    "samples_per_s",
    "samples_per_cpu_s",
    "tokens_per_s",
    "peak_rss_mib",
    "train_call_s",
    "build_and_train_s",
    "rss_before_train_mib",
)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median/min/max of each measure per setting, and alignkit / faster TRL setting."""
    medians: dict[str, Any] = {}
    for setting in ALL_SETTINGS:
        mine = [r for r in runs if r["framework"] == setting]
        if mine:
            medians[setting] = {key: spread([r[key] for r in mine]) for key in SUMMARISED}
            medians[setting]["runs"] = len(mine)
    trl_settings = [s for s in TRL_SETTINGS if s in medians]
    faster = max(trl_settings, key=lambda s: medians[s]["samples_per_s"]["median"])
    ours, theirs = medians["alignkit"], medians[faster]
    return {
        "medians": medians,
        "faster_trl_setting": faster,
        "samples_per_s_ratio": ours["samples_per_s"]["median"] / theirs["samples_per_s"]["median"],
        "tokens_per_s_ratio": ours["tokens_per_s"]["median"] / theirs["tokens_per_s"]["median"],
        # Pairs per second of the worker's own CPU time: less sensitive to busy neighbours.
        "samples_per_cpu_s_ratio": ours["samples_per_cpu_s"]["median"]
        / max(medians[s]["samples_per_cpu_s"]["median"] for s in trl_settings),
        "peak_rss_ratio": ours["peak_rss_mib"]["median"] / theirs["peak_rss_mib"]["median"],
    }


def checks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Do both really train, on the same tokens, from the same reference?"""
    first_losses = [r["losses"][0] for r in runs]
    step1_ok = all(abs(x - LOG2) < 1e-4 for x in first_losses)
    learned = {
        r["framework"]: statistics.mean(r["losses"][-10:]) < 0.5 * statistics.mean(r["losses"][:5])
        for r in runs
    }
    epoch_tokens = {r["framework"]: r["epoch_tokens"] for r in runs}
    tables = {r["framework"]: r["reference_logps"] for r in runs if r["reference_logps"]}
    reference_diff = None
    if {"alignkit", "trl-precompute"} <= set(tables):
        reference_diff = max(
            abs(a - b)
            for row_a, row_b in zip(tables["alignkit"], tables["trl-precompute"], strict=True)
            for a, b in zip(row_a, row_b, strict=True)
        )
    return {
        "step1_loss_is_log2": step1_ok,
        "step1_losses": sorted(set(round(x, 6) for x in first_losses)),
        "loss_halved_by_end": learned,
        "same_epoch_tokens": len(set(epoch_tokens.values())) == 1,
        "epoch_tokens": epoch_tokens,
        "reference_logps_max_abs_diff_alignkit_vs_trl": reference_diff,
    }


def final_losses(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per setting (first run): loss at step 1, mean of the first and last 10 steps, last."""
    out = {}
    for setting in ALL_SETTINGS:
        run = next((r for r in runs if r["framework"] == setting), None)
        if run is not None:
            losses = run["losses"]
            out[setting] = {
                "step_1": losses[0],
                "first_10_mean": statistics.mean(losses[:10]),
                "last_10_mean": statistics.mean(losses[-10:]),
                "last": losses[-1],
            }
    return out


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


# ----------------------------------------------------------------------------- output


def print_table(summary: dict[str, Any], threads: int, out: Any = sys.stdout) -> None:
    def cell(stat: dict[str, float], digits: int) -> str:
        return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"

    columns = (
        ("pairs/s", "samples_per_s", 1),
        ("pairs/CPU-s", "samples_per_cpu_s", 1),
        ("tokens/s", "tokens_per_s", 0),
        ("peak RSS MiB", "peak_rss_mib", 0),
        ("train() s", "train_call_s", 2),
    )
    print(f"\ntorch threads = {threads}; median [min-max] over runs", file=out)
    print(f"{'setting':<16}" + "".join(f"{name:>22}" for name, _, _ in columns), file=out)
    for setting, m in summary["medians"].items():
        cells = "".join(f"{cell(m[key], digits):>22}" for _, key, digits in columns)
        print(f"{setting:<16}{cells}", file=out)
    print(
        f"alignkit / {summary['faster_trl_setting']} (the faster TRL setting): "
        f"samples/s x{summary['samples_per_s_ratio']:.2f}, "
        f"samples/CPU-s x{summary['samples_per_cpu_s_ratio']:.2f}, "
        f"peak RSS x{summary['peak_rss_ratio']:.2f}",
        file=out,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="alignkit vs TRL training speed",
        epilog="sft-tiny, sft-small, rm-tiny, rm-small take their own options: "
        "compare_trl.py sft-small --help",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting (>= 1)")
    parser.add_argument(
        "--threads", default="1", help="torch threads per worker; a comma list runs each"
    )
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-pairs", type=int, default=None, help="8 (dpo-small: 4)")
    parser.add_argument("--max-length", type=int, default=None, help="128 (dpo-small: 256)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="same for both (linear decay); 1e-3 (dpo-small: 5e-6)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of timing")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="grpo-tiny, ppo-tiny (20), dpo-small (15): optimizer steps",
    )
    parser.add_argument("--prompts-per-step", type=int, default=2, help="grpo-tiny")
    parser.add_argument("--generations", type=int, default=8, help="grpo-tiny: per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="grpo-tiny")
    parser.add_argument(
        "--trl-malloc",
        action="store_true",
        help="dpo-small: also run TRL with glibc's malloc set by environment variables as\n"
        "alignkit's trainers set it (the faster TRL setting is the ratio's)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/<name>.json")
    args = parser.parse_args(argv)
    args.thread_counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if args.repeats < 1 or not args.thread_counts or min(args.thread_counts) < 1:
        parser.error("--repeats and --threads must be >= 1")
    args.out = args.out or BENCH_DIR / "results" / f"{args.benchmark}.json"
    if args.benchmark != "dpo-small":  # dpo-small sets its own (bench/dpo_small.py)
        defaults = {"batch_pairs": 8, "max_length": 128, "lr": 1e-3, "steps": 20}
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    return args


def require_packages() -> None:
    """alignkit (installed, or this checkout's src/) and TRL must be importable."""
    if importlib.util.find_spec("alignkit") is None:
        sys.path.insert(0, str(BENCH_DIR.parent / "src"))
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (pins trl==1.16.0)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(BENCH_DIR))
    import train_cases

    if argv and argv[0] in train_cases.CASES:  # SFT and reward models: their own options
        require_packages()
        return train_cases.main(argv)
    args = parse_args(argv)
    require_packages()
    if args.benchmark == "dpo-small":
        sys.path.insert(0, str(BENCH_DIR))
        import dpo_small

        return dpo_small.main(args)
    if args.benchmark == "grpo-tiny":
        sys.path.insert(0, str(BENCH_DIR))
        import grpo_tiny

        return grpo_tiny.main(args)
    if args.benchmark == "ppo-tiny":
        sys.path.insert(0, str(BENCH_DIR))
        import ppo_tiny

        return ppo_tiny.main(args)
    load_start = list(os.getloadavg())
    by_threads: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        scratch = Path(tmp)
        inputs = write_inputs(scratch, args.pairs, args.seed)
        for threads in args.thread_counts:
            runs = []
            for repeat in range(args.repeats):
                shift = repeat % len(SETTINGS)
                for setting in SETTINGS[shift:] + SETTINGS[:shift]:
                    run = run_worker(setting, threads, inputs, args, scratch)
                    run["repeat"] = repeat
                    runs.append(run)
                    print(
                        f"threads={threads} repeat={repeat} {setting:<15} "
                        f"{run['samples_per_s']:7.1f} pairs/s  "
                        f"{run['samples_per_cpu_s']:7.1f} pairs/CPU-s  "
                        f"{run['tokens_per_s']:8.0f} tok/s  "
                        f"peak RSS {run['peak_rss_mib']:5.0f} MiB  "
                        f"load {run['loadavg_before'][0]:.2f}->{run['loadavg_after'][0]:.2f}",
                        flush=True,
                    )
            summary = summarise(runs)
            by_threads[str(threads)] = {
                **summary,
                "checks": checks(runs),
                "losses": final_losses(runs),
                # The per-pair reference tables and step losses are checked above; kept out of
                # the committed file, which stays small.
                "runs": [
                    {k: v for k, v in r.items() if k not in ("reference_logps", "losses")}
                    for r in runs
                ],
            }
            print_table(summary, threads)
            print(json.dumps(by_threads[str(threads)]["checks"], indent=1))
    primary = by_threads[str(args.thread_counts[0])]
    report = {
        "benchmark": args.benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(args.thread_counts),
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "setup": {
            "model": f"tiny preset, {inputs['parameters']} parameters, fp32, seed {args.seed}",
            "data": inputs["data_source"],
            "pairs": args.pairs,
            "pairs_per_step": args.batch_pairs,
            "max_length": args.max_length,
            "loss": f"sigmoid DPO, beta {args.beta}",
            "lr": args.lr,
            "schedule": "linear decay to 0, no warm-up; AdamW, grad clip 1.0, 1 epoch",
            "timed_window": f"end of step {args.warmup_steps} to end of the last step",
            "repeats": args.repeats,
            "order": "settings alternate, rotating the order every repeat",
        },
        "samples_per_s_ratio": primary["samples_per_s_ratio"],
        "peak_rss_ratio": primary["peak_rss_ratio"],
        "faster_trl_setting": primary["faster_trl_setting"],
        "primary_threads": args.thread_counts[0],
        "by_threads": by_threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
