"""SFT and reward-model training speed against TRL 1.16: ``sft-tiny``, ``sft-small``, ``rm-tiny``,
``rm-small``.

    python bench/compare_trl.py sft-small [--repeats 3] [--threads 1] [--settings a,b] [--out P]

Each case alternates fresh worker processes (bench/_sft_worker.py, bench/_rm_worker.py) of its
settings, rotating the order every repeat, on the same saved initial weights, the same rows and
the same token ids (TRL is given the ids and labels alignkit's tokeniser made of the rows), fp32
(or with ``--precision bf16`` bf16 autocast over fp32 weights in both: TRL ``bf16=True``), one
torch thread, gradient checkpointing off, logging every 10 steps, no saving.
The first ``warmup_steps`` optimizer steps are outside the timed window.

- ``*-tiny``: the ``tiny`` preset (random weights, seed 0), the synthetic task's rows.
- ``*-small``: SmolLM2-135M-Instruct from the alignkit cache (``alignkit models fetch
  smollm2-135m-instruct``), rows of realistic length: each is 1-6 consecutive synthetic rows
  joined (their prompts as one prompt, their answers as one answer), 40-250 tokens.

Reported per setting: median [min-max] examples (SFT) or pairs (RM) per second and per CPU
second, tokens/s, s/step, peak RSS, and for the real model the model-FLOPs utilisation
(bench/mfu.py: 6 x non-embedding parameters x tokens + LM head on the completion tokens, over
this machine's matmul rate in the run's precision, measured once per run at the same thread
count). The ratio is
the faster alignkit setting over the faster TRL setting. Results: bench/results/<case>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import (
    PRECISIONS,
    alternating_runs,
    machine,
    medians,
    print_table,
    run_worker,
    write_report,
)

BENCH_DIR = Path(__file__).resolve().parent
SMALL_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Case:
    kind: str  # "sft" or "rm"
    model: str  # "tiny" or a cached model name
    settings: tuple[str, ...]
    rows: int  # synthetic rows to build
    max_length: int
    batch: int  # SFT: packed rows per step; RM: pairs per step
    max_steps: int
    lr: float
    join: int  # rows joined into one: 1 (as is) or up to this many (realistic lengths)


CASES = {
    "sft-tiny": Case("sft", "tiny", ("alignkit", "alignkit-packing", "trl", "trl-packing"),
                     1024, 128, 8, 23, 1e-3, 1),
    "sft-small": Case("sft", SMALL_MODEL, ("alignkit-packing", "trl-packing"),
                      256, 256, 2, 15, 1e-5, 6),
    "rm-tiny": Case("rm", "tiny", ("alignkit", "trl"), 512, 128, 8, 23, 1e-3, 1),
    "rm-small": Case("rm", SMALL_MODEL, ("alignkit", "trl"), 128, 256, 2, 15, 1e-5, 6),
}  # fmt: skip


#: Every setting each worker can run (``--settings`` picks among them).
WORKER_SETTINGS = {
    "sft": ("alignkit", "alignkit-packing", "trl", "trl-packing"),
    "rm": ("alignkit", "trl"),
}


# ----------------------------------------------------------------------------- inputs


def joined_rows(rows: list[dict[str, Any]], n: int, join: int, fields: tuple[str, ...]) -> list:
    """``n`` rows; with ``join > 1`` row i joins the next 1..join source rows (cycling: 1, 2, ..)
    field by field with a newline, so lengths spread from one row's to ``join`` rows'."""
    out, cursor = [], 0
    for i in range(n):
        k = 1 + i % join
        parts = [rows[(cursor + j) % len(rows)] for j in range(k)]
        cursor += k
        row = {f: "\n".join(p[f] for p in parts) for f in fields}
        if "margin" in parts[0]:
            row["margin"] = round(statistics.mean(p["margin"] for p in parts), 4)
        out.append(row)
    return out


def write_inputs(case: Case, root: Path, seed: int) -> dict[str, Any]:
    """The model directory, the text rows (alignkit's input) and their token ids (TRL's)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from alignkit.data.synthetic import SyntheticTask
    from alignkit.data.tokenize import tokenize_preferences, tokenize_sft
    from alignkit.models import load_policy
    from alignkit.models.fetch import cached_model_path, fetch_hint

    hf_logging.disable_progress_bar()
    if case.model == "tiny":
        model, tokenizer = load_policy("tiny", dtype="float32", seed=seed)
        model_dir = root / "tiny-model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        model_name = f"tiny preset, random weights (seed {seed})"
    else:
        found = cached_model_path(case.model)
        if found is None:
            raise SystemExit(fetch_hint(case.model))
        model_dir, model_name = found, f"{case.model} (alignkit cache)"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = SyntheticTask(seed=seed)
    if case.kind == "sft":
        source = task.sft_rows("train")
        rows = joined_rows(source, case.rows, case.join, ("prompt", "completion"))
        examples = tokenize_sft(rows, tokenizer, case.max_length, "truncate")
        ids = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        lengths = [len(e["input_ids"]) for e in ids]
        what = "sft_rows('train')"
    else:
        source = task.preference_rows("train")
        rows = joined_rows(source, case.rows, case.join, ("prompt", "chosen", "rejected"))
        examples = tokenize_preferences(rows, tokenizer, case.max_length, "truncate")
        ids = [
            {
                "chosen_ids": e["prompt_ids"] + e["chosen_ids"],
                "rejected_ids": e["prompt_ids"] + e["rejected_ids"],
                "margin": e["margin"],
            }
            for e in examples
        ]
        lengths = [len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ids]
        what = "preference_rows('train')"
    data, tokens = root / "rows.jsonl", root / "tokens.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tokens.write_text("".join(json.dumps(r) + "\n" for r in ids), encoding="utf-8")
    joined = f", each joining 1-{case.join} consecutive rows" if case.join > 1 else ""
    return {
        "model_dir": model_dir,
        "model": model_name,
        "data": data,
        "tokens": tokens,
        "data_source": f"SyntheticTask(seed={seed}).{what}: {len(rows)} rows{joined} "
        f"(cycled over the {len(source)} source rows)",
        "row_tokens": {"min": min(lengths), "median": statistics.median(lengths),
                       "max": max(lengths), "total": sum(lengths)},
    }  # fmt: skip


# ----------------------------------------------------------------------------- runs


def packed_batch(inputs: dict[str, Any], case: Case) -> int:
    """Padded SFT batch with the tokens of ``case.batch`` packed rows, on average."""
    from alignkit.data.packing import pack_examples

    with inputs["tokens"].open(encoding="utf-8") as handle:
        examples = [json.loads(line) for line in handle]
    rows = pack_examples(examples, case.max_length)
    return max(1, round(case.batch * len(examples) / len(rows)))


def run_one(
    setting: str, case: Case, inputs: dict[str, Any], args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    options = {
        "setting": setting,
        "model-dir": inputs["model_dir"],
        "data": inputs["data"],
        "tokens": inputs["tokens"],
        "seed": args.seed,
        "lr": case.lr,
        "max-length": case.max_length,
        "max-steps": case.max_steps,
        "warmup-steps": args.warmup_steps,
        "precision": args.precision,
    }
    if case.kind == "sft":
        options.update(rows=case.batch, batch=inputs["padded_batch"])
    else:
        options.update(batch=case.batch)
    worker = "_sft_worker.py" if case.kind == "sft" else "_rm_worker.py"
    return run_worker(worker, setting, options, threads=args.threads, scratch=scratch)


def add_mfu(result: dict[str, Any], case: Case, shapes: dict[str, int], rate: dict) -> None:
    """Model FLOPs of the window (bench/mfu.py) and their share of the machine's matmul rate."""
    from mfu import training_flops, utilisation

    head = {}
    if case.kind == "sft":  # the LM head on the completion tokens, the rows the loss scores
        head = {"hidden_size": shapes["hidden_size"], "vocab_size": shapes["vocab_size"],
                "scored_rows": result["window_scored"]}  # fmt: skip
    flops = training_flops(result["non_embedding_parameters"], result["window_tokens"], **head)
    # The frameworks shuffle differently, so a short window holds different rows: tokens per
    # (CPU-)second compare the work done even where samples per second do not.
    result["tokens_per_cpu_s"] = result["window_tokens"] / result["window_cpu_s"]
    result.update(utilisation(flops, result["window_s"], result["window_cpu_s"], rate))


SUMMARISED = ("samples_per_s", "samples_per_cpu_s", "tokens_per_s", "tokens_per_cpu_s", "s_per_step",
              "peak_rss_mib", "train_call_s", "mfu", "mfu_cpu")  # fmt: skip


def summarise(runs: list[dict[str, Any]], settings: tuple[str, ...]) -> dict[str, Any]:
    by_setting = medians(runs, settings, SUMMARISED, counted=True)

    def best(prefix: str) -> str:
        names = [s for s in settings if s.startswith(prefix)]
        return max(names, key=lambda s: by_setting[s]["samples_per_s"]["median"])

    ours, theirs = best("alignkit"), best("trl")
    ratio = {
        key: by_setting[ours][key]["median"] / by_setting[theirs][key]["median"]
        for key in (
            "samples_per_s",
            "samples_per_cpu_s",
            "tokens_per_s",
            "tokens_per_cpu_s",
            "peak_rss_mib",
        )
    }
    return {
        "medians": by_setting,
        "faster_alignkit_setting": ours,
        "faster_trl_setting": theirs,
        **{f"{key}_ratio": value for key, value in ratio.items()},
    }


def checks(runs: list[dict[str, Any]], case: Case) -> dict[str, Any]:
    """Same tokens in every setting; every run lowers its loss."""
    dataset = {r["framework"]: r["dataset_tokens"] for r in runs}
    first_k = 3
    lowered = {
        r["framework"]: statistics.mean(r["losses"][-first_k:])
        < statistics.mean(r["losses"][:first_k])
        for r in runs
    }
    return {
        "dataset_tokens": dataset,
        "same_dataset_tokens": len({json.dumps(v, sort_keys=True) for v in dataset.values()}) == 1,
        f"loss_lower_at_end_than_first_{first_k}_steps": lowered,
        "first_losses": {r["framework"]: round(r["losses"][0], 5) for r in runs},
    }


def print_summary(summary: dict[str, Any], unit: str, with_mfu: bool) -> None:
    columns = [(f"{unit}/s", "samples_per_s", 2), (f"{unit}/CPU-s", "samples_per_cpu_s", 2),
               ("tokens/s", "tokens_per_s", 0), ("s/step", "s_per_step", 3),
               ("peak RSS MiB", "peak_rss_mib", 0)]  # fmt: skip
    if with_mfu:
        columns += [("MFU %", "mfu", 1, 100.0), ("MFU (CPU) %", "mfu_cpu", 1, 100.0)]
    print("\nmedian [min-max] over runs")
    print_table(summary["medians"], columns, setting_width=18, column_width=24)
    print(
        f"{summary['faster_alignkit_setting']} / {summary['faster_trl_setting']} (the faster "
        f"setting of each): {unit}/s x{summary['samples_per_s_ratio']:.2f}, {unit}/CPU-s "
        f"x{summary['samples_per_cpu_s_ratio']:.2f}, tokens/CPU-s "
        f"x{summary['tokens_per_cpu_s_ratio']:.2f}, peak RSS x{summary['peak_rss_mib_ratio']:.2f}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="alignkit vs TRL: SFT and reward models")
    parser.add_argument("benchmark", choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default=None, help="comma list (default: all the case's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of timing")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the case's")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, or bf16 autocast over fp32 weights in both (TRL bf16=True)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default bench/results/<case>[-bf16].json"
    )
    args = parser.parse_args(argv)
    case = CASES[args.benchmark]
    args.setting_list = tuple(args.settings.split(",")) if args.settings else case.settings
    unknown = set(args.setting_list) - set(WORKER_SETTINGS[case.kind])
    if (
        unknown
        or not any(s.startswith("alignkit") for s in args.setting_list)
        or not any(s.startswith("trl") for s in args.setting_list)
    ):
        parser.error(
            f"--settings: choose alignkit and TRL settings among {WORKER_SETTINGS[case.kind]}"
        )
    if args.repeats < 1 or args.threads < 1 or args.warmup_steps < 1:
        parser.error("--repeats, --threads and --warmup-steps must be >= 1")
    if args.max_steps is not None:
        if args.max_steps <= args.warmup_steps:
            parser.error("--max-steps must exceed --warmup-steps")
        case = dataclasses.replace(case, max_steps=args.max_steps)
    args.case = case
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    args.out = args.out or BENCH_DIR / "results" / f"{args.benchmark}{suffix}.json"
    return args


def _run_line(run: dict[str, Any]) -> str:
    return (
        f"repeat={run['repeat']} {run['framework']:<17} {run['samples_per_s']:7.2f} /s  "
        f"{run['samples_per_cpu_s']:7.2f} /CPU-s  {run['tokens_per_s']:7.0f} tok/s  "
        f"{run['s_per_step']:.3f} s/step  MFU {100 * run['mfu']:4.1f}% "
        f"(CPU {100 * run['mfu_cpu']:4.1f}%)  "
        f"peak RSS {run['peak_rss_mib']:5.0f} MiB  "
        f"load {run['loadavg_before'][0]:.2f}->{run['loadavg_after'][0]:.2f}"
    )


def main(argv: list[str]) -> int:
    from mfu import machine_matmul_rate, model_shapes

    args = parse_args(argv)
    case = args.case
    settings = args.setting_list
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        scratch = Path(tmp)
        inputs = write_inputs(case, scratch, args.seed)
        if case.kind == "sft":
            inputs["padded_batch"] = packed_batch(inputs, case)
        from transformers import AutoConfig

        shapes = model_shapes(AutoConfig.from_pretrained(inputs["model_dir"]))
        rate = machine_matmul_rate(
            args.threads, shapes["hidden_size"], shapes["intermediate_size"], dtype=args.precision
        )
        print(
            f"{args.precision} matmul rate at {args.threads} thread(s): "
            f"{rate['flops_per_s'] / 1e9:.1f} GFLOP/s"
        )

        def measured(setting: str) -> dict[str, Any]:
            run = run_one(setting, case, inputs, args, scratch)
            add_mfu(run, case, shapes, rate)
            return run

        runs = alternating_runs(settings, args.repeats, measured, _run_line)
    summary = summarise(runs, settings)
    unit = "examples" if case.kind == "sft" else "pairs"
    print_summary(summary, unit, with_mfu=case.model != "tiny")
    found = checks(runs, case)
    print(json.dumps(found, indent=1))
    report = {
        "benchmark": args.benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine([args.threads]),
        "matmul_rate": rate,
        "setup": {
            "model": inputs["model"],
            "model_shapes": shapes,
            "data": inputs["data_source"],
            "row_tokens": inputs["row_tokens"],
            "max_length": case.max_length,
            "per_step": (
                f"{case.batch} packed rows (packing settings) or {inputs['padded_batch']} "
                "examples (padded settings: the same tokens per step on average)"
                if case.kind == "sft"
                else f"{case.batch} pairs ({2 * case.batch} rows)"
            ),
            "optimizer_steps": case.max_steps,
            "timed_window": f"end of step {args.warmup_steps} to end of step {case.max_steps}",
            "lr": f"{case.lr}, linear decay to 0 over the steps, AdamW, grad clip 1.0",
            "precision": f"{args.precision} (fp32 weights); TRL bf16="
            f"{args.precision == 'bf16'}, gradient_checkpointing=False",
            "threads": args.threads,
            "repeats": args.repeats,
            "order": "settings alternate in fresh processes, the order rotating every repeat",
            "mfu": "bench/mfu.py: (6 x non-embedding params x tokens + 6 x d x V x completion "
            f"tokens for SFT) / window time, over the {args.precision} matmul rate",
        },
        **{k: v for k, v in summary.items() if k != "medians"},
        "medians": summary["medians"],
        "checks": found,
        "wall_s": time.perf_counter() - started,
        "loadavg_end": list(os.getloadavg()),
        "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs],
        "losses": {r["framework"]: r["losses"] for r in runs if r["repeat"] == 0},
    }
    write_report(args.out, report)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0
