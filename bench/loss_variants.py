"""GRPO vs GSPO vs CISPO vs DAPO-style on the bundled digit-sorting task: held-out reward after
N iterations, mean and 95% interval over seeds.

    PYTHONPATH=src .venv/bin/python bench/loss_variants.py [--iterations 100] [--seeds 5]

What runs (all from the SFT warm-up of examples/sft_sort.yaml, trained once, seed 0):

- ``grpo``: examples/grpo.yaml (ppo_clip 0.2, token-mean, KL k3+ 0.02 in the loss), but with two
  optimizer steps of 64 sequences per iteration so that the second step is off-policy and the
  losses differ (with one step per iteration every ratio is 1 and the three are the same
  policy gradient);
- ``gspo``, ``cispo``: the same with ``policy_loss.name`` gspo (its defaults: clip 3e-4/4e-4,
  seq-mean-token-mean) or cispo (weight cap 5, no lower bound, token-mean);
- ``dapo``: examples/dapo.yaml (clip-higher 0.28, dynamic sampling, overlong buffer 2, truncated
  completions masked, no KL), same batch and learning rate.

Held-out reward, on the first 100 rows of sort_heldout.jsonl: ``greedy`` is the trainer's
``eval/reward`` (one greedy completion per prompt), ``sampled`` the mean reward of 8 completions
per prompt at temperature 1 (a fixed generator), the expectation that RL maximises. The 95%
interval is mean +- t(0.975, seeds - 1) * std / sqrt(seeds). One torch thread; writes
bench/results/loss_variants.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignkit.config import load_config
from alignkit.data.synthetic import write_verifiable_tasks
from alignkit.rollout import load_prompt_file
from alignkit.tracking import read_metrics
from alignkit.trainers.pg import build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig
from alignkit.trainers.sft import SFTConfig, train_sft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QUIET = ("logging.progress_bar=false", "logging.plots=false", "checkpoint.every=null")
#: Two-sided 97.5% quantiles of Student's t by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
VARIANTS = {
    "grpo": ("grpo.yaml", ()),
    "gspo": ("grpo.yaml", ("policy_loss.name=gspo", "policy_loss.clip_ratio=null")),
    "cispo": ("grpo.yaml", ("policy_loss.name=cispo", "policy_loss.clip_ratio=null")),
    "dapo": ("dapo.yaml", ()),
}


def warm_up(work: Path, data: dict[str, Path]) -> Path:
    cfg = load_config(
        SFTConfig,
        EXAMPLES / "sft_sort.yaml",
        [f"output_dir={work}", f"data.train_file={data['sort_sft']}", *QUIET[:2]],
    )
    return Path(train_sft(cfg)["last_checkpoint"]) / "model"


def sampled_heldout(trainer, prompts) -> float:
    sampling = dataclasses.replace(trainer.sampling, samples_per_prompt=8, temperature=1.0)
    with torch.no_grad():
        exp = trainer.engine.generate(prompts, sampling, generator=torch.Generator().manual_seed(7))
    return float(trainer.reward(exp.prompts, exp.completions, exp.row_fields).mean())


def run(variant: str, seed: int, iterations: int, work: Path, model: Path, data: dict) -> dict:
    example, options = VARIANTS[variant]
    overrides = [
        f"output_dir={work}",
        f"run_name={variant}-{seed}",
        f"seed={seed}",
        f"model.name={model}",
        f"data.train_file={data['sort_prompts']}",
        f"data.eval_file={data['sort_heldout']}",
        f"train.iterations={iterations}",
        "train.sequences_per_minibatch=64",
        f"eval.every={iterations}",
        "logging.every=1",
        *QUIET,
        *options,
    ]
    cfg = load_config(PGConfig, EXAMPLES / example, [*get_method("grpo").defaults, *overrides])
    started = time.perf_counter()
    trainer = build_pg_trainer(cfg)
    prompts = load_prompt_file(str(data["sort_heldout"]), trainer.tokenizer, 32, limit=100)
    before = sampled_heldout(trainer, prompts)
    trainer.train()
    trainer.model.eval()
    after = sampled_heldout(trainer, prompts)
    records = read_metrics(trainer.run_dir.metrics_path)
    final = [r for r in records if "eval/reward" in r][-1]
    train_reward = [r["reward/mean"] for r in records if "reward/mean" in r]
    return {
        "variant": variant,
        "seed": seed,
        "greedy_before": trainer.initial_eval["eval/reward"],
        "greedy": final["eval/reward"],
        "sampled_before": before,
        "sampled": after,
        "train_reward_last10": statistics.fmean(train_reward[-10:]),
        "extra_rounds": sum(r.get("rollout/filter_rounds", 0.0) for r in records),
        "seconds": time.perf_counter() - started,
    }


def interval(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5


def table(results: list[dict], iterations: int) -> str:
    lines = [
        f"| variant | held-out greedy reward after {iterations} it. | held-out sampled reward "
        f"after {iterations} it. | training reward, last 10 it. | s per run |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        cells = []
        for key in ("greedy", "sampled", "train_reward_last10", "seconds"):
            mean, half = interval([r[key] for r in rows])
            cells.append(f"{mean:.1f}" if key == "seconds" else f"{mean:.3f} ± {half:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    start = results[0]
    lines.append(
        f"| (warm-up, before RL) | {start['greedy_before']:.3f} | {start['sampled_before']:.3f} "
        "| | |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/loss_variants.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="loss_variants-"))
    data = write_verifiable_tasks(work / "data")
    model = warm_up(work, data)
    results = []
    for seed in range(args.seeds):
        for variant in VARIANTS:
            result = run(variant, seed, args.iterations, work, model, data)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(table(results, args.iterations))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"iterations": args.iterations, "seeds": args.seeds, "runs": results}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
