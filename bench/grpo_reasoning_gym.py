"""``grpo-small``: examples/grpo_reasoning_gym.yaml's GRPO job on SmolLM2-135M-Instruct in
alignkit and in TRL 1.16's GRPOTrainer, side by side (time per step split into generation,
scoring and update; reward curve; held-out accuracy).

    python bench/compare_trl.py grpo-small [--steps 20] [--precision bf16] [--repeats 1]
    python bench/grpo_reasoning_gym.py [--steps 20] [--frameworks alignkit,trl] [--out PATH]

The job (bench/_grpo_rg_worker.py): SmolLM2-135M-Instruct (``alignkit models fetch
smollm2-135m-instruct``) with LoRA, reasoning-gym chain_sum (two one-digit terms; 256 training
prompts, seed 1; 32 held-out, seed 2), 8 prompts x 4 completions per step, 64 new tokens, T 0.7,
no KL, lr 1e-4, fp32 or (``--precision bf16``) bf16 autocast over fp32 weights in both (TRL
``bf16=True``). Each framework runs in a fresh process with one torch thread, one after the
other (the order rotating with ``--repeats``). Both start from the same weights, so the
held-out accuracy before training is measured once (alignkit's step-0 evaluation). The first
``--warmup-steps`` steps are left out of the per-step medians. Writes
``bench/results/grpo-small[-bf16].json``; the table is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import BENCH_DIR, PRECISIONS, alternating_runs, machine, run_worker, write_report

TASK = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
INSTRUCTION = "Reply with only the number."


def write_prompts(root: Path) -> dict[str, Path]:
    from alignkit.rollout.verifiers.reasoning_tasks import reasoning_gym_rows

    paths = {}
    for name, size, seed in (("train", 256, 1), ("eval", 32, 2)):
        rows = reasoning_gym_rows("chain_sum", size, seed, instruction=INSTRUCTION, **TASK)
        paths[name] = root / f"chain_sum_{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


SPLIT = ("generation_s", "scoring_s", "experience_s", "update_s")


def summarise(run: dict[str, Any], warmup_steps: int) -> dict[str, Any]:
    steps, rewards = run["step_s"][warmup_steps:], run["rewards"]
    windows = [rewards[i : i + 5] for i in range(0, len(rewards), 5)]
    return {
        **run,
        **{f"{key}_median": statistics.median(run[key][warmup_steps:]) for key in SPLIT},
        # CPU seconds of steps warmup_steps+1.. (the list starts at step 2): with one thread, the
        # measure a busy machine disturbs least.
        "cpu_s_per_step_median": statistics.median(run["step_cpu_s"][max(warmup_steps - 1, 0) :]),
        "s_per_step_mean": statistics.mean(steps),
        "s_per_step_median": statistics.median(steps),
        "reward_by_5_steps": [round(statistics.mean(w), 3) for w in windows],
        "load_1min": [run["loadavg_before"][0], run["loadavg_after"][0]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--frameworks", default="alignkit,trl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=1, help="left out of the medians")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--out", type=Path, default=None, help="bench/results/grpo-small*.json")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup_steps:
        parser.error("--steps must exceed --warmup-steps")
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    args.out = args.out or BENCH_DIR / "results" / f"grpo-small{suffix}.json"
    from alignkit.models.fetch import cached_model_path, fetch_hint

    model_dir = cached_model_path("smollm2-135m-instruct")
    if model_dir is None:
        raise SystemExit(fetch_hint("smollm2-135m-instruct"))
    frameworks = tuple(args.frameworks.split(","))
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="alignkit-grpo-rg-") as tmp:
        scratch = Path(tmp)
        prompts = write_prompts(scratch)
        options = {
            "model-dir": model_dir,
            "prompts": prompts["train"],
            "eval-prompts": prompts["eval"],
            "seed": args.seed,
            "steps": args.steps,
            "max-new-tokens": 64,
            "lr": 1e-4,
            "precision": args.precision,
        }

        def one(framework: str) -> dict[str, Any]:
            result = run_worker(
                "_grpo_rg_worker.py",
                framework,
                {"framework": framework, **options},
                threads=1,
                scratch=scratch,
            )
            return summarise(result, args.warmup_steps)

        runs = alternating_runs(
            frameworks,
            args.repeats,
            one,
            lambda r: (
                f"{r['framework']:<9} {r['s_per_step_median']:.1f} s/step median (generation "
                f"{r['generation_s_median']:.1f}, scoring {r['scoring_s_median']:.2f}, update "
                f"{r['update_s_median']:.1f}; CPU {r['cpu_s_per_step_median']:.1f} s/step)  "
                f"reward by 5 steps {r['reward_by_5_steps']}  "
                f"held-out after {r['held_out_after']:.3f}  peak RSS {r['peak_rss_mib']:.0f} MiB  "
                f"load {r['load_1min'][0]:.1f}->{r['load_1min'][1]:.1f}"
            ),
        )
    report = {
        "benchmark": "grpo-small",
        "command": f"python bench/compare_trl.py grpo-small --steps {args.steps} --repeats "
        f"{args.repeats} --precision {args.precision}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine([1]),
        "setup": {
            "model": "SmolLM2-135M-Instruct, fp32 weights, LoRA r16 alpha32 all linear layers",
            "precision": f"{args.precision} (alignkit precision={args.precision}, TRL "
            f"bf16={args.precision == 'bf16'})",
            "task": f"reasoning-gym chain_sum {TASK}, 256 train (seed 1), 32 held-out (seed 2)",
            "batch": "8 prompts x 4 completions per optimizer step, 64 new tokens, T 0.7",
            "loss": "clip 0.2, token-mean over the step (TRL dapo), group advantages, no KL",
            "reward": "math_accuracy (math-verify) on the completion text",
            "steps": args.steps,
            "medians_over": f"steps {args.warmup_steps + 1}..{args.steps}",
            "split": "generation (TRL _generate; alignkit timing/rollout), scoring (reward "
            "functions), experience (generation + scoring + old log-probs + advantages), update "
            "(the rest of the step)",
            "threads": 1,
        },
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "runs": runs,
    }
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
