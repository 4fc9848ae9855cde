"""``python bench/compare_trl.py ppo-tiny``: alignkit's PPO against TRL's ``PPOTrainer``.

TRL 1.16.0 (the pinned version) has no PPO: ``trl.experimental.ppo`` was removed in TRL 1.13.0
(huggingface/trl#7020, "Remove PPOTrainer"), so ``import trl.experimental.ppo`` fails with
``ModuleNotFoundError``. The last release that has it is TRL 1.12.0; it imports and runs against
the installed torch/transformers/accelerate/datasets. The TRL worker therefore runs TRL 1.12.0,
installed once with ``pip install --no-deps --target <cache>`` (pure Python, no dependency
changes; the shared environment keeps 1.16.0) and put first on that worker's ``PYTHONPATH``.
``ALIGNKIT_BENCH_TRL_PPO`` names another such directory.

The job (bench/_ppo_worker.py): the tiny preset saved once (random weights), a tiny reward
model saved once in both formats with identical weights (alignkit's ``RewardModel``, last-token
pooling and a linear head with zero bias, and the same backbone plus ``score`` weights as a
``LlamaForSequenceClassification``; checked equal on sample sequences), the critic of both
initialised from that reward model, the same prompt token ids, ``--prompts-per-step x
--generations`` prompts per rollout with one completion each (TRL's PPO samples one per
prompt), ``--max-new-tokens``, one PPO epoch of ``MINIBATCHES`` optimizer steps, k1 KL in the
reward with coefficient ``KL_COEF``, fp32, one torch thread, fresh processes alternating.
Writes ``bench/results/ppo-tiny.json`` with ``step_time_ratio`` (alignkit s/step over TRL
s/step) and ``peak_rss_ratio``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import alternating_runs, cell, machine, medians, run_worker, spread, write_report

FRAMEWORKS = ("alignkit", "trl")
TRL_PPO_VERSION = "1.12.0"  # the last TRL release with trl.experimental.ppo
TRL_PPO_DIR = Path.home() / ".cache" / "alignkit-bench" / f"trl-{TRL_PPO_VERSION}"
MINIBATCHES = 2
KL_COEF = 0.05


def trl_ppo_path() -> Path:
    """A directory holding TRL with ``trl.experimental.ppo``; installs TRL 1.12.0 there once."""
    given = os.environ.get("ALIGNKIT_BENCH_TRL_PPO")
    target = Path(given) if given else TRL_PPO_DIR
    if not (target / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file():
        print(f"installing trl=={TRL_PPO_VERSION} (no dependencies) into {target}", flush=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        subprocess.run([*pip, str(target), f"trl=={TRL_PPO_VERSION}"], check=True)
    return target


def save_reward_models(root: Path, seed: int) -> tuple[Path, Path]:
    """One random tiny reward model, saved for alignkit and as a TRL sequence classifier.

    alignkit's linear head gets a zero bias, so that ``head(h) == score(h)`` for the
    bias-free ``score`` of ``LlamaForSequenceClassification``: both score a sequence by the
    same weights applied to its last real token's hidden state.
    """
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignkit.models.reward import load_reward_model

    model, tokenizer = load_reward_model("tiny", dtype="float32", seed=seed)
    with torch.no_grad():
        model.head.bias.zero_()
    ours = model.save_pretrained(root / "reward", tokenizer)
    saved = model.backbone.config.to_dict()
    for key in ("id2label", "label2id"):
        saved.pop(key, None)
    config = LlamaConfig(**saved, num_labels=1)
    classifier = LlamaForSequenceClassification(config).eval()
    state = {f"model.{k}": v for k, v in model.backbone.state_dict().items()}
    state["score.weight"] = model.head.weight.detach().clone()
    classifier.load_state_dict(state, strict=True)
    theirs = root / "reward-hf"
    classifier.save_pretrained(theirs)
    tokenizer.save_pretrained(theirs)
    generator = torch.Generator().manual_seed(seed)
    for length in (5, 17, 40):
        ids = torch.randint(3, config.vocab_size, (1, length), generator=generator)
        with torch.no_grad():
            a = model(ids).rewards
            b = classifier(input_ids=ids).logits.squeeze(-1)
        if not torch.allclose(a, b, atol=1e-5):
            raise RuntimeError(f"reward models disagree on a length-{length} sequence: {a} {b}")
    return ours, theirs


def write_inputs(root: Path, seed: int, n_prompts: int) -> dict[str, Any]:
    """Policy, reward models and the prompts (text for alignkit, its token ids for TRL)."""
    from transformers.utils import logging as hf_logging

    from alignkit.data.synthetic.verifiable import verifiable_rows
    from alignkit.models import load_policy
    from alignkit.rollout import prompts_from_records

    hf_logging.disable_progress_bar()
    model, tokenizer = load_policy("tiny", dtype="float32", seed=seed)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    reward, reward_hf = save_reward_models(root, seed + 1)
    rows = verifiable_rows("sort", seed)["prompts"][:n_prompts]
    records = [{"prompt": r["prompt"]} for r in rows]
    ids = [p.input_ids for p in prompts_from_records(records, tokenizer)]  # alignkit's own ids
    prompts, prompt_ids = root / "prompts.jsonl", root / "prompt-ids.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompt_ids.write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
    return {
        "model_dir": root / "model",
        "reward_dir": reward,
        "reward_hf_dir": reward_hf,
        "prompts": {"alignkit": prompts, "trl": prompt_ids},
    }


def run_one(
    framework: str, inputs: dict[str, Any], args: Any, scratch: Path, trl_path: Path
) -> dict[str, Any]:
    rollout = args.prompts_per_step * args.generations
    options = {
        "framework": framework,
        "model-dir": inputs["model_dir"],
        "reward-dir": inputs["reward_dir"],
        "reward-hf-dir": inputs["reward_hf_dir"],
        "prompts": inputs["prompts"][framework],
        "seed": args.seed,
        "precision": args.precision,
        "steps": args.steps,
        "rollout": rollout,
        "minibatches": MINIBATCHES,
        "max-new-tokens": args.max_new_tokens,
        "lr": args.lr,
        "kl-coef": KL_COEF,
    }
    result = run_worker(
        "_ppo_worker.py",
        framework,
        options,
        threads=args.thread_counts[0],
        scratch=scratch,
        python_path=[trl_path] if framework == "trl" else [],
    )
    skip = args.warmup_steps
    steps, cpu = result["step_s"][skip:], result["step_cpu_s"][skip:]
    tokens = result["completion_tokens"][skip:]
    result["s_per_step"] = statistics.median(steps)
    result["cpu_s_per_step"] = statistics.median(cpu)
    gc_cpu = result["gc_cpu_s"][skip:]
    result["gc_cpu_s_per_step"] = statistics.median(gc_cpu)
    result["cpu_s_per_step_excl_gc"] = statistics.median(
        [c - g for c, g in zip(cpu, gc_cpu, strict=True)]
    )
    result["completions_per_s"] = rollout * len(steps) / sum(steps)
    result["generated_tokens_per_s"] = sum(tokens) / sum(steps)
    for part, seconds in result.get("split_s", {}).items():
        result[f"split_{part}_median"] = statistics.median(seconds[skip:])
    return result


PER_STEP = ("step_s", "step_cpu_s", "gc_s", "gc_cpu_s", "completion_tokens", "scores", "split_s")
PER_STEP += ("kl_mean", "kl_sum_per_sequence", "explained_variance")
KEYS = ("s_per_step", "cpu_s_per_step", "gc_cpu_s_per_step", "cpu_s_per_step_excl_gc")
KEYS += ("completions_per_s", "generated_tokens_per_s", "peak_rss_mib")


def main(args: Any) -> int:
    rollout = args.prompts_per_step * args.generations
    if rollout % MINIBATCHES:
        raise SystemExit(
            f"ppo-tiny: {rollout} prompts per rollout do not split into 2 mini-batches"
        )
    trl_path = trl_ppo_path()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignkit-ppo-bench-") as tmp:
        scratch = Path(tmp)
        inputs = write_inputs(scratch, args.seed, n_prompts=args.steps * rollout)
        runs = alternating_runs(
            FRAMEWORKS,
            args.repeats,
            lambda framework: run_one(framework, inputs, args, scratch, trl_path),
            lambda run: (
                f"repeat={run['repeat']} {run['framework']:<9} {run['s_per_step']:.3f} s/step  "
                f"{run['cpu_s_per_step']:.3f} CPU-s/step "
                f"(gc.collect {run['gc_cpu_s_per_step']:.3f})  "
                f"{run['completions_per_s']:6.1f} completions/s  "
                f"{run['generated_tokens_per_s']:6.0f} gen tok/s  "
                f"peak RSS {run['peak_rss_mib']:4.0f} MiB  "
                f"load {run['loadavg_before'][0]:.2f}->{run['loadavg_after'][0]:.2f}"
            ),
        )
    by_framework = medians(runs, FRAMEWORKS, KEYS)
    split = {}  # per framework: the median over runs of each part's median s/step
    for fw in FRAMEWORKS:
        mine = [r for r in runs if r["framework"] == fw]
        parts = sorted(k for k in mine[0] if k.startswith("split_") and k.endswith("_median"))
        split[fw] = {
            p.removeprefix("split_").removesuffix("_median"): spread([r[p] for r in mine])
            for p in parts
        }
    a, t = by_framework["alignkit"], by_framework["trl"]
    report = {
        "benchmark": "ppo-tiny",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "trl_version": runs[[r["framework"] for r in runs].index("trl")]["trl_version"],
        "trl_version_note": "TRL 1.16.0 has no PPO (removed in 1.13.0); 1.12.0 is the last with it",
        "setup": {
            "model": f"tiny preset, random weights (seed {args.seed})",
            "precision": args.precision,
            "reward_model": f"tiny backbone + linear head, random (seed {args.seed + 1}), "
            "identical weights in both formats",
            "critic": "initialised from the reward model in both",
            "prompts_per_rollout": rollout,
            "completions_per_prompt": 1,
            "max_new_tokens": args.max_new_tokens,
            "minibatches_per_rollout": MINIBATCHES,
            "ppo_epochs": 1,
            "steps": args.steps,
            "timed": f"steps {args.warmup_steps + 1}..{args.steps}, whole steps (incl. logging)",
            "loss": "PPO clip 0.2, token-mean; value clip 0.2; GAE gamma 1 lambda 0.95; "
            "advantages whitened",
            "kl": f"k1 in the reward, coef {KL_COEF}, reference = initial policy",
            "optimizer": f"AdamW lr {args.lr} constant (policy and critic), no grad clipping",
            "threads": args.thread_counts[0],
            "repeats": args.repeats,
        },
        "medians": by_framework,
        "split_s": split,
        "step_time_ratio": a["s_per_step"]["median"] / t["s_per_step"]["median"],
        "cpu_time_ratio": a["cpu_s_per_step"]["median"] / t["cpu_s_per_step"]["median"],
        # Without the time inside gc.collect (TRL's loop collects twice per step).
        "cpu_time_ratio_excl_gc": a["cpu_s_per_step_excl_gc"]["median"]
        / t["cpu_s_per_step_excl_gc"]["median"],
        "peak_rss_ratio": a["peak_rss_mib"]["median"] / t["peak_rss_mib"]["median"],
        "bench_wall_s": time.perf_counter() - started,
        "machine": machine(args.thread_counts[:1]),
        # Per-step lists are summarised above; each run keeps its scalars and load averages.
        "runs": [{k: v for k, v in r.items() if k not in PER_STEP} for r in runs],
        "per_step_scores_first_run": {
            fw: next(r["scores"] for r in runs if r["framework"] == fw) for fw in FRAMEWORKS
        },
    }
    # The parent process sees the environment's TRL; the TRL worker ran the side-installed one.
    report["machine"]["versions"]["trl"] = report["trl_version"]
    print("\nmedian [min-max] over runs")
    for fw, m in by_framework.items():
        print(f"{fw:<9} " + "  ".join(f"{k}={cell(m[k], 3)}" for k in KEYS))
    for fw, parts in split.items():
        if not parts:
            continue
        cells = ", ".join(f"{k} {v['median']:.4f}" for k, v in parts.items())
        print(f"{fw} split (s/step, medians): {cells}")
    print(
        f"step_time_ratio {report['step_time_ratio']:.2f}, "
        f"cpu_time_ratio {report['cpu_time_ratio']:.2f} "
        f"({report['cpu_time_ratio_excl_gc']:.2f} without gc.collect), "
        f"peak_rss_ratio {report['peak_rss_ratio']:.2f} (TRL {report['trl_version']})"
    )
    write_report(args.out, report)
    print(f"wrote {args.out} ({report['bench_wall_s']:.0f} s)")
    return 0
