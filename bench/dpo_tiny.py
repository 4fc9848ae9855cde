"""``python bench/compare_trl.py dpo-tiny``: alignkit's DPO against TRL 1.16's ``DPOTrainer``.

DPO (sigmoid, beta 0.1) on the ``tiny`` preset, 512 pairs of the bundled synthetic task, 8 pairs
per step, max length 128, fp32, one epoch (64 optimizer steps), the same seed, learning rate and
initial weights (the tiny model is saved once and loaded by both). Three settings, each run in a
fresh process (bench/_dpo_worker.py), alternating (the order rotates every repeat):

- ``alignkit``: alignkit's DPO trainer (reference log-probs computed once before step 1).
- ``trl``: TRL's ``DPOTrainer`` with its reference handling defaults (a reference model
  forward in every step).
- ``trl-precompute``: TRL with ``precompute_ref_log_probs=True``.

Throughput counts steps ``warmup_steps+1 .. 64`` (end of step 3 to the end of training, timed by
a per-step hook in both); tokens are the non-pad tokens (attention mask) of the chosen and
rejected rows, counted the same way in both. Peak RSS is the worker process' ``ru_maxrss``.
The ratio is alignkit's median over the faster TRL setting's median. Results go to
``bench/results/<benchmark>.json``; see bench/README.md.

``dpo-small`` (bench/dpo_small.py) runs the same worker on a real model and reuses this
module's runs, summary and checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import alternating_runs, machine, medians, print_table, run_worker, write_report

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


def run_dpo_worker(
    setting: str, threads: int, inputs: dict[str, Any], args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    """One DPO training run (bench/_dpo_worker.py) in a fresh process."""
    options = {
        "framework": "trl-precompute" if setting == TRL_MALLOC else setting,
        "model-dir": inputs["model_dir"],
        "data": inputs["data"],
        "seed": args.seed,
        "precision": args.precision,
        "lr": args.lr,
        "beta": args.beta,
        "batch-pairs": args.batch_pairs,
        "max-length": args.max_length,
        "warmup-steps": args.warmup_steps,
    }
    env = TRL_MALLOC_ENV if setting == TRL_MALLOC else None
    result = run_worker(
        "_dpo_worker.py", setting, options, threads=threads, scratch=scratch, env=env
    )
    result["framework"] = setting
    return result


# ----------------------------------------------------------------------------- summary


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
    by_setting = medians(runs, ALL_SETTINGS, SUMMARISED, counted=True)
    trl_settings = [s for s in TRL_SETTINGS if s in by_setting]
    faster = max(trl_settings, key=lambda s: by_setting[s]["samples_per_s"]["median"])
    ours, theirs = by_setting["alignkit"], by_setting[faster]
    return {
        "medians": by_setting,
        "faster_trl_setting": faster,
        "samples_per_s_ratio": ours["samples_per_s"]["median"] / theirs["samples_per_s"]["median"],
        "tokens_per_s_ratio": ours["tokens_per_s"]["median"] / theirs["tokens_per_s"]["median"],
        # Pairs per second of the worker's own CPU time: less sensitive to busy neighbours.
        "samples_per_cpu_s_ratio": ours["samples_per_cpu_s"]["median"]
        / max(by_setting[s]["samples_per_cpu_s"]["median"] for s in trl_settings),
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


COLUMNS = (
    ("pairs/s", "samples_per_s", 1),
    ("pairs/CPU-s", "samples_per_cpu_s", 1),
    ("tokens/s", "tokens_per_s", 0),
    ("peak RSS MiB", "peak_rss_mib", 0),
    ("train() s", "train_call_s", 2),
)


def print_summary(summary: dict[str, Any], threads: int, out: Any = sys.stdout) -> None:
    print(f"\ntorch threads = {threads}; median [min-max] over runs", file=out)
    print_table(summary["medians"], COLUMNS, setting_width=16, column_width=22, out=out)
    print(
        f"alignkit / {summary['faster_trl_setting']} (the faster TRL setting): "
        f"samples/s x{summary['samples_per_s_ratio']:.2f}, "
        f"samples/CPU-s x{summary['samples_per_cpu_s_ratio']:.2f}, "
        f"peak RSS x{summary['peak_rss_ratio']:.2f}",
        file=out,
    )


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    load_start = list(os.getloadavg())
    by_threads: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        scratch = Path(tmp)
        inputs = write_inputs(scratch, args.pairs, args.seed)
        for threads in args.thread_counts:
            runs = alternating_runs(
                SETTINGS,
                args.repeats,
                lambda setting, threads=threads: run_dpo_worker(
                    setting, threads, inputs, args, scratch
                ),
                lambda run, threads=threads: (
                    f"threads={threads} repeat={run['repeat']} {run['framework']:<15} "
                    f"{run['samples_per_s']:7.1f} pairs/s  "
                    f"{run['samples_per_cpu_s']:7.1f} pairs/CPU-s  "
                    f"{run['tokens_per_s']:8.0f} tok/s  "
                    f"peak RSS {run['peak_rss_mib']:5.0f} MiB  "
                    f"load {run['loadavg_before'][0]:.2f}->{run['loadavg_after'][0]:.2f}"
                ),
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
            print_summary(summary, threads)
            print(json.dumps(by_threads[str(threads)]["checks"], indent=1))
    primary = by_threads[str(args.thread_counts[0])]
    report = {
        "benchmark": args.benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(args.thread_counts),
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "setup": {
            "model": f"tiny preset, {inputs['parameters']} parameters, seed {args.seed}",
            "precision": args.precision,
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
    write_report(args.out, report)
    print(f"\nwrote {args.out}")
    return 0
