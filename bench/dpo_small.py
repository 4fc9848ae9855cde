"""The ``dpo-small`` data: preference pairs of realistic lengths built from the synthetic task.

The synthetic task's own rows are short (a 10-token prompt, 15-35-token answers), far from the
100-250-token rows of real preference data, where padding and the LM head decide the speed. So
each bench pair joins several consecutive synthetic rows: a prompt of 1-3 of the task's
prompts, a chosen answer of 3-6 chosen answers and a rejected answer of 5-10 rejected answers
(counts drawn with the seed, independently; rejected answers are half as long), separated by blank lines. Measured with
SmolLM2's tokenizer at max length 256 and 4 pairs per step (the first 96 pairs): rows of 152
tokens on average, 24.6% of a padded batch's positions padding, the prompts 14.4% of the real
tokens (the issue's measurement: 26% and 15.6%).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import alternating_runs, machine, medians, write_report
from dpo_tiny import (
    TRL_MALLOC,
    TRL_MALLOC_ENV,
    checks,
    final_losses,
    print_summary,
    run_dpo_worker,
    summarise,
)


def small_pairs(n_pairs: int, seed: int = 0) -> tuple[list[dict[str, str]], str]:
    """``n_pairs`` joined pairs (see the module docstring) and how they were made."""
    from alignkit.data.synthetic import SyntheticTask

    rows = SyntheticTask(seed=seed).preference_rows("train")
    rng = random.Random(seed)
    pairs: list[dict[str, Any]] = []
    cursor = 0
    for _ in range(n_pairs):
        counts = (rng.randint(1, 3), rng.randint(3, 6), rng.randint(5, 10))
        parts = dict(zip(("prompt", "chosen", "rejected"), counts, strict=True))
        pair = {}
        for key, count in parts.items():
            # The task lists each prompt's pairs together: step over them for new prompts.
            stride = 3 if key == "prompt" else 1
            parts_of = (rows[(cursor + stride * k) % len(rows)][key] for k in range(count))
            pair[key] = "\n\n".join(parts_of)
        cursor += max(parts.values())
        pairs.append(pair)
    how = (
        f"SyntheticTask(seed={seed}).preference_rows('train') joined: per pair 1-3 prompts, "
        "3-6 chosen and 5-10 rejected answers of consecutive rows, prompts of different rows (bench/dpo_small.py)"
    )
    return pairs, how


# ----------------------------------------------------------------------------- the benchmark

SMALL_MODEL = "smollm2-135m-instruct"
SETTINGS = ("alignkit", "trl-precompute")
SMALL_DEFAULTS = {"batch_pairs": 4, "max_length": 256, "lr": 5e-6, "steps": 15}


def write_small_inputs(root: Path, n_pairs: int, seed: int) -> dict[str, Any]:
    """The fetched SmolLM2 directory (read by both, never written) and the pairs file."""
    from alignkit.models.fetch import cached_model_path, fetch_hint

    model_dir = cached_model_path(SMALL_MODEL)
    if model_dir is None:
        raise SystemExit(fetch_hint(SMALL_MODEL))
    pairs, source = small_pairs(n_pairs, seed)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return {"model_dir": model_dir, "data": data, "data_source": source}


def token_shares(inputs: dict[str, Any], args: Any) -> dict[str, float]:
    """Padding share of the padded steps, prompt share of the real tokens (as tokenised), and
    the response (scored) tokens' share of the real tokens (the MFU's LM-head count)."""
    from transformers import AutoTokenizer

    from alignkit.data import PreferenceCollator, tokenize_preferences

    tokenizer = AutoTokenizer.from_pretrained(inputs["model_dir"])
    rows = [json.loads(line) for line in inputs["data"].read_text(encoding="utf-8").splitlines()]
    data = tokenize_preferences(rows, tokenizer, args.max_length, "truncate", extra_fields=[])
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id or 0)
    n, real, positions, prompt, scored = args.batch_pairs, 0, 0, 0, 0
    for i in range(0, len(data) - n + 1, n):
        batch = collate([data[j] for j in range(i, i + n)])
        real += int(batch["attention_mask"].sum())
        positions += batch["input_ids"].numel()
        prompt += 2 * sum(len(data[j]["prompt_ids"]) for j in range(i, i + n))
        scored += int(batch["response_mask"].sum())
    return {
        "padding_share": 1 - real / positions,
        "prompt_share_of_real": prompt / real,
        "response_share_of_real": scored / real,
    }


def model_shapes_of(model_dir: Path) -> dict[str, int]:
    """The model's shapes and non-embedding parameters (bench/mfu.py), built on the meta device."""
    import torch
    from mfu import model_shapes, non_embedding_parameters
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        parameters = non_embedding_parameters(AutoModelForCausalLM.from_config(config))
    return {**model_shapes(config), "non_embedding_parameters": parameters}


def window_flops(run: dict[str, Any], shapes: dict[str, int], response_share: float) -> float:
    """Model FLOPs of a run's timed window: its real tokens, the LM head on their response
    share (the frameworks shuffle differently, so each window holds its own rows)."""
    from mfu import training_flops

    tokens = run["window_tokens"]
    return training_flops(
        shapes["non_embedding_parameters"],
        tokens,
        hidden_size=shapes["hidden_size"],
        vocab_size=shapes["vocab_size"],
        scored_rows=round(tokens * response_share),
    )


def _run_line(run: dict[str, Any]) -> str:
    return (
        f"repeat={run['repeat']} {run['framework']:<15} {run['samples_per_s']:6.2f} pairs/s  "
        f"{run['s_per_step']:6.2f} s/step  {run['cpu_s_per_step']:6.2f} CPU-s/step  "
        f"{run['tokens_per_s']:6.0f} tok/s  MFU {100 * run['mfu']:4.1f}% "
        f"(CPU {100 * run['mfu_cpu']:4.1f}%)  peak RSS {run['peak_rss_mib']:5.0f} MiB  "
        f"load {run['loadavg_before'][0]:.2f}->{run['loadavg_after'][0]:.2f}  "
        f"in-window kernel {run['window_sys_s']:.2f} s, {run['window_page_faults']} page faults"
    )


def main(args: Any) -> int:
    """``compare_trl.py dpo-small``: alternating fresh processes, the table, the JSON."""
    from mfu import machine_matmul_rate, utilisation

    for key, value in SMALL_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps <= args.warmup_steps:
        raise SystemExit("--steps must exceed --warmup-steps")
    threads = args.thread_counts[0]
    started = time.perf_counter()
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        scratch = Path(tmp)
        inputs = write_small_inputs(scratch, args.steps * args.batch_pairs, args.seed)
        shares = token_shares(inputs, args)
        shapes = model_shapes_of(inputs["model_dir"])
        rate = machine_matmul_rate(
            threads, shapes["hidden_size"], shapes["intermediate_size"], dtype=args.precision
        )
        print(
            f"{args.precision} matmul rate at {threads} thread(s): "
            f"{rate['flops_per_s'] / 1e9:.1f} GFLOP/s"
        )

        def run_one(setting: str) -> dict[str, Any]:
            run = run_dpo_worker(setting, threads, inputs, args, scratch)
            run["s_per_step"] = run["window_s"] / run["window_steps"]
            run["cpu_s_per_step"] = run["window_cpu_s"] / run["window_steps"]
            flops = window_flops(run, shapes, shares["response_share_of_real"])
            run.update(utilisation(flops, run["window_s"], run["window_cpu_s"], rate))
            return run

        settings = (*SETTINGS, TRL_MALLOC) if args.trl_malloc else SETTINGS
        runs = alternating_runs(settings, args.repeats, run_one, _run_line)
    summary = summarise(runs)
    per_step = ("s_per_step", "cpu_s_per_step", "mfu", "mfu_cpu")
    for setting, spreads in medians(runs, list(summary["medians"]), per_step).items():
        summary["medians"][setting].update(spreads)
    ours, theirs = summary["medians"]["alignkit"], summary["medians"][summary["faster_trl_setting"]]
    summary["cpu_s_per_step_ratio"] = (
        theirs["cpu_s_per_step"]["median"] / ours["cpu_s_per_step"]["median"]
    )
    print_summary(summary, threads)
    print(
        f"s/step: alignkit {ours['s_per_step']['median']:.2f}, {summary['faster_trl_setting']} "
        f"{theirs['s_per_step']['median']:.2f}; CPU-s/step: alignkit "
        f"{ours['cpu_s_per_step']['median']:.2f}, TRL {theirs['cpu_s_per_step']['median']:.2f} "
        f"(TRL / alignkit x{summary['cpu_s_per_step_ratio']:.2f}); MFU (CPU): alignkit "
        f"{100 * ours['mfu_cpu']['median']:.1f}%, TRL {100 * theirs['mfu_cpu']['median']:.1f}%"
    )
    found = checks(runs)
    print(json.dumps(found, indent=1))
    report = {
        "benchmark": "dpo-small",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python bench/compare_trl.py dpo-small --repeats "
        f"{args.repeats} --steps {args.steps} --warmup-steps {args.warmup_steps} "
        f"--precision {args.precision}" + (" --trl-malloc" if args.trl_malloc else ""),
        "runtime_s": time.perf_counter() - started,
        "machine": machine(args.thread_counts),
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "matmul_rate": rate,
        "setup": {
            "model": f"{SMALL_MODEL} (alignkit models fetch), fp32 weights",
            "precision": args.precision,
            "data": inputs["data_source"],
            "pairs": args.steps * args.batch_pairs,
            "pairs_per_step": args.batch_pairs,
            "max_length": args.max_length,
            **{k: round(v, 4) for k, v in shares.items()},
            "loss": f"sigmoid DPO, beta {args.beta}",
            "lr": args.lr,
            "trl": "DPOTrainer, precompute_ref_log_probs=True, "
            f"bf16={args.precision == 'bf16'}, no checkpointing"
            + (f"; {TRL_MALLOC}: the same with {TRL_MALLOC_ENV}" if args.trl_malloc else ""),
            "model_shapes": shapes,
            "mfu": "bench/mfu.py: (6 x non-embedding params x real tokens of the window's chosen "
            "and rejected rows + 6 x d x V x their response share of them) / window time, over "
            f"the {args.precision} matmul rate",
            "timed_window": f"end of step {args.warmup_steps} to end of step {args.steps}",
            "repeats": args.repeats,
            "order": "the settings alternate in fresh processes, the order rotating every repeat",
        },
        **{k: v for k, v in summary.items() if k != "medians"},
        "medians": summary["medians"],
        "checks": found,
        "losses": final_losses(runs),
        "runs": [
            {k: v for k, v in r.items() if k not in ("reference_logps", "losses")} for r in runs
        ],
    }
    write_report(args.out, report)
    print(f"\nwrote {args.out}")
    return 0
