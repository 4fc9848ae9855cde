"""``python bench/compare_trl.py grpo-tiny``: alignkit's GRPO against TRL 1.16's GRPOTrainer.

The fair set-up of research/online-rl.md section 4 (see bench/_grpo_worker.py for the job): the
tiny preset saved once (random weights: it never emits EOS, so every completion has exactly
``max_new_tokens`` tokens in both and no EOS suppression is needed; the per-token rates are
reported too), the same prompts, prompts x G completions per step, one optimizer step per
generation batch, fp32, dropout off, no gradient checkpointing, one torch thread, each run in a
fresh process with only one framework imported, settings alternating with the order rotated
every repeat. The first ``warmup_steps`` steps are left out of the timing. alignkit's split
(generation / scoring / update) comes from its ``timing/*`` metrics; TRL's step time is measured
by a ``TrainerCallback`` around each whole step (generation included), its split is not
reported. Writes ``bench/results/grpo-tiny.json`` with ``step_time_ratio`` (alignkit s/step over
TRL s/step) and ``peak_rss_ratio``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import alternating_runs, cell, medians, run_worker, spread, write_report

FRAMEWORKS = ("alignkit", "trl")


def write_inputs(root: Path, seed: int, n_prompts: int) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from alignkit.data.synthetic.verifiable import verifiable_rows
    from alignkit.models import load_policy

    hf_logging.disable_progress_bar()
    model, tokenizer = load_policy("tiny", dtype="float32", seed=seed)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = verifiable_rows("sort", seed)["prompts"][:n_prompts]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return {"model_dir": root / "model", "prompts": prompts}


def run_one(framework: str, inputs: dict[str, Any], args: Any, scratch: Path) -> dict[str, Any]:
    options = {
        "framework": framework,
        "model-dir": inputs["model_dir"],
        "prompts": inputs["prompts"],
        "seed": args.seed,
        "precision": args.precision,
        "steps": args.steps,
        "prompts-per-step": args.prompts_per_step,
        "generations": args.generations,
        "max-new-tokens": args.max_new_tokens,
        "lr": args.lr,
    }
    threads = args.thread_counts[0]
    result = run_worker("_grpo_worker.py", framework, options, threads=threads, scratch=scratch)
    result["load_1min"] = {
        "before": result["loadavg_before"][0],
        "after": result["loadavg_after"][0],
    }
    skip = args.warmup_steps
    steps = result["step_s"][skip:]
    tokens = result["completion_tokens"][skip:]
    sequences = args.prompts_per_step * args.generations
    result["s_per_step"] = statistics.median(steps)
    result["completions_per_s"] = sequences * len(steps) / sum(steps)
    # CPU seconds per step over the window from the end of the last warm-up step to the end of
    # the last step (logging between steps included on both sides), and the window's wall time.
    cpu, wall = result["step_end_cpu_s"], result["step_end_wall_s"]
    timed = len(cpu) - skip
    result["cpu_s_per_step"] = (cpu[-1] - cpu[skip - 1]) / timed
    result["window_s_per_step"] = (wall[-1] - wall[skip - 1]) / timed
    result["generated_tokens_per_s"] = sum(tokens) / sum(steps)
    for part in ("generation_s", "scoring_s", "update_s"):
        if part in result:
            result[f"{part}_median"] = statistics.median(result[part][skip:])
    return result


def main(args: Any) -> int:
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="alignkit-grpo-bench-") as tmp:
        scratch = Path(tmp)
        inputs = write_inputs(scratch, args.seed, n_prompts=args.steps * args.prompts_per_step)
        runs = alternating_runs(
            FRAMEWORKS,
            args.repeats,
            lambda framework: run_one(framework, inputs, args, scratch),
            lambda run: (
                f"repeat={run['repeat']} {run['framework']:<9} {run['s_per_step']:.4f} s/step  "
                f"{run['cpu_s_per_step']:.4f} CPU-s/step  "
                f"{run['completions_per_s']:6.1f} completions/s  "
                f"{run['generated_tokens_per_s']:7.0f} gen tok/s  "
                f"peak RSS {run['peak_rss_mib']:4.0f} MiB"
            ),
        )
    keys = (
        "s_per_step",
        "cpu_s_per_step",
        "window_s_per_step",
        "completions_per_s",
        "generated_tokens_per_s",
        "peak_rss_mib",
    )
    by_framework = medians(runs, FRAMEWORKS, keys)
    split = {
        k: spread([r[f"{k}_median"] for r in runs if r["framework"] == "alignkit"])
        for k in ("generation_s", "scoring_s", "update_s")
    }
    ours, theirs = by_framework["alignkit"], by_framework["trl"]
    report = {
        "benchmark": "grpo-tiny",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "setup": {
            "model": f"tiny preset, random weights (seed {args.seed})",
            "precision": args.precision,
            "prompts_per_step": args.prompts_per_step,
            "completions_per_prompt": args.generations,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "timed": f"steps {args.warmup_steps + 1}..{args.steps}, whole steps",
            "loss": "PPO clip 0.2, token-mean over the step (TRL dapo), group advantages, beta 0",
            "optimizer": f"AdamW lr {args.lr} constant, grad clip 1.0",
            "threads": args.thread_counts[0],
            "repeats": args.repeats,
            "reward": "bench/_grpo_worker.py:digit_share",
        },
        "medians": by_framework,
        "alignkit_split_s": split,
        "step_time_ratio": ours["s_per_step"]["median"] / theirs["s_per_step"]["median"],
        "cpu_time_ratio": ours["cpu_s_per_step"]["median"] / theirs["cpu_s_per_step"]["median"],
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "peak_rss_ratio": ours["peak_rss_mib"]["median"] / theirs["peak_rss_mib"]["median"],
        "runs": [{k: v for k, v in r.items() if not isinstance(v, list)} for r in runs],
    }
    print("\nmedian [min-max] over runs")
    for fw, m in by_framework.items():
        print(f"{fw:<9} " + "  ".join(f"{k}={cell(m[k], 3)}" for k in keys))
    print(
        "alignkit split (s/step): " + ", ".join(f"{k} {v['median']:.3f}" for k, v in split.items())
    )
    print(
        f"step_time_ratio {report['step_time_ratio']:.2f} (target <= 0.5), "
        f"cpu_time_ratio {report['cpu_time_ratio']:.2f}, "
        f"peak_rss_ratio {report['peak_rss_ratio']:.2f}"
    )
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0
