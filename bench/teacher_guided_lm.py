"""Samples-to-threshold of teacher-guided rollouts when training a real (tiny) language model.

Called by ``bench/teacher_guided.py lm``. Everything runs through alignkit's own stack: SFT
warm-ups with ``build_sft_trainer`` (tiny preset), then GRPO with ``build_pg_trainer``, whose
rollouts come from ``TransformersEngine`` (on-policy) or ``TeacherGuidedEngine``
(``rollout.teacher`` + ``rollout.alpha``), with the trainer's truncated importance weights.

The task is the bundled ``add`` task ("add 3+8:" -> "11", one token per digit) restricted to
one-digit operands: 100 prompts, 45 of them with a carry (a two-digit answer "1d").

- The policy's warm-up (``POLICY_EPOCHS`` epochs of SFT) sees the 55 prompts without a carry
  (``PLAIN_REPEATS`` times) and, for each of the 45 with one, all ten answers "10" ... "19"
  once: it learns the form of a carry answer but not its digit, and puts ~9% on the right
  answer of each carry prompt (a rare, not an unseen, answer).
- The RL prompts are the 45 carry prompts; the reward is ``exact_match`` (1 for the exact sum).
- "Teacher knows": the tiny preset SFT'd longer (``TEACHER_EPOCHS``) on all 100 right answers
  (P(right answer) ~0.98 on the RL prompts).
- "Teacher does not know": the same SFT, but every carry answer replaced by the sum without its
  carry ((a + b) mod 10): confident and wrong exactly where the policy must learn.

Both tasks share the policy, the prompts and the reward, so on-policy runs (no teacher) are the
same in both and are run once. The progress measure is exact, not sampled: the policy's mean
probability of the right answer (its digits and EOS, teacher-forced) over the 45 RL prompts,
computed after every iteration; "samples to threshold" counts sampled completions until it
reaches ``--threshold``. Runs that never do are counted at the budget (so their mean is a lower
bound) and reported as "reached k/n".

GRPO settings (all proposals alike): 8 prompts x 8 completions per iteration, at most 3 new
tokens, temperature 1, one optimizer step per iteration, PPO clip 0.2, token-mean, no KL,
AdamW at a constant learning rate, importance weights min(π/q, 2) (the default cap). Each
proposal's learning rate is the best of ``LEARNING_RATES`` by mean samples-to-threshold on the
tuning seeds (separate from the reported seeds); the table is over the evaluation seeds, with
a 95% Student-t interval. The warm-ups are trained once per benchmark run (deterministic, seed
0), not per seed: the seeds vary the RL run (prompt order, sampling).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

METHODS: dict[str, str | float | None] = {
    "on-policy": None,
    "α by KL symmetry": "kl_symmetry",
    "α = 0.5": 0.5,
    "min-variance": "min_variance",
}
TASKS = ("teacher knows", "teacher does not know")
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)
TUNE_SEEDS = (100, 101, 102)
EVAL_SEEDS = (0, 1, 2, 3, 4, 5)
PLAIN_REPEATS = 3
POLICY_EPOCHS, TEACHER_EPOCHS = 12, 80
PROMPTS_PER_ITERATION, GROUP, MAX_NEW_TOKENS = 8, 8, 3
# Two-sided 97.5% quantiles of Student's t, by degrees of freedom.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 9: 2.262}


def add_rows() -> dict[str, list[dict[str, str]]]:
    """The warm-up sets (``{"prompt", "completion"}``) and the RL prompts (``{"prompt",
    "answer"}``) described in the module docstring."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    plain = [p for p in pairs if sum(p) < 10]
    carry = [p for p in pairs if sum(p) >= 10]

    def row(a: int, b: int, answer: int | str, key: str = "completion") -> dict[str, str]:
        return {"prompt": f"add {a}+{b}:", key: str(answer)}

    # The policy learns the form of a carry answer ("1" and a digit) but not the digit: every
    # one of the ten appears once, so the right one gets about a tenth of the mass.
    guesses = [row(a, b, f"1{d}") for a, b in carry for d in range(10)]
    return {
        "policy": [row(a, b, a + b) for a, b in plain] * PLAIN_REPEATS + guesses,
        "teacher knows": [row(a, b, a + b) for a, b in pairs],
        "teacher does not know": [row(a, b, (a + b) % 10) for a, b in pairs],
        "rl": [row(a, b, a + b, key="answer") for a, b in carry],
    }


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def quiet_overrides(root: Path, name: str, seed: int) -> list[str]:
    return [
        f"output_dir={root}",
        f"run_name={name}",
        f"seed={seed}",
        "overwrite=true",
        "logging.progress_bar=false",
        "logging.plots=false",
        "logging.console_format=''",
        "checkpoint.keep_last=1",
    ]


def warm_up(
    root: Path, name: str, rows: list[dict[str, str]], epochs: int, batch: int = 16
) -> Path:
    """SFT the tiny preset on `rows`; the final checkpoint's model directory."""
    from alignkit.config import load_config
    from alignkit.trainers.sft import SFTConfig, build_sft_trainer

    data = write_jsonl(root / f"{name}.jsonl", rows)
    cfg = load_config(
        SFTConfig,
        None,
        [
            *quiet_overrides(root, name, 0),
            "model.name=tiny",
            f"data.train_file={data}",
            "data.max_length=16",
            f"epochs={epochs}",
            f"examples_per_device={batch}",
            "optim.lr=5e-3",
            "optim.schedule=cosine",
            "optim.warmup_ratio=0.05",
            f"logging.every={10**6}",
        ],
    )
    trainer = build_sft_trainer(cfg)
    trainer.train()
    return trainer.run_dir.checkpoint_dir(trainer.state.step) / "model"


def answer_batch(tokenizer: Any, rows: list[dict[str, str]]) -> dict[str, Tensor]:
    """Prompt + answer + EOS of every RL prompt, collated for ``response_logps``."""
    from alignkit.data.collate import SFTCollator
    from alignkit.data.tokenize import tokenize_sft

    records = [{"prompt": r["prompt"], "completion": r["answer"]} for r in rows]
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id)(tokenize_sft(records, tokenizer, 16))
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "response_mask": batch["labels"] != -100,
    }


@torch.no_grad()
def answer_probability(model: torch.nn.Module, batch: dict[str, Tensor]) -> float:
    """Mean over the prompts of the model's probability of the exact answer (then EOS)."""
    from alignkit.models.forward import response_logps

    return float(response_logps(model, batch).exp().mean())


def threshold_trainer(threshold: float) -> type:
    """A GRPO trainer whose evaluation is :func:`answer_probability` on the RL prompts (every
    iteration) and which stops once it reaches `threshold`."""
    from alignkit.trainers.pg import PolicyGradientTrainer

    class ThresholdTrainer(PolicyGradientTrainer):
        def __init__(self, *args: Any, probe: dict[str, Tensor], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.probe = probe
            self.curve: list[float] = []

        def _has_evaluation(self) -> bool:
            return True

        def evaluate(self) -> dict[str, float]:
            value = answer_probability(self.unwrapped_model, self.probe)
            self.curve.append(value)
            if value >= threshold:
                self.state.stop_reason = "threshold"
            return {"eval/answer_prob": value}

    return ThresholdTrainer


def rl_run(
    root: Path,
    policy: Path,
    teacher: Path | None,
    alpha: str | float | None,
    lr: float,
    seed: int,
    iterations: int,
    threshold: float,
) -> dict[str, Any]:
    """One GRPO run; samples to threshold (None: not reached) and the probability curve."""
    from alignkit.config import load_config
    from alignkit.trainers.pg import build_pg_trainer
    from alignkit.trainers.rl_config import PGConfig

    sequences = PROMPTS_PER_ITERATION * GROUP
    rollout = [f"rollout.teacher={teacher}", f"rollout.alpha={alpha}"] if teacher else []
    cfg = load_config(
        PGConfig,
        None,
        [
            *quiet_overrides(root, "rl", seed),
            f"model.name={policy}",
            f"data.train_file={root / 'rl.jsonl'}",
            "data.max_prompt_length=16",
            "rewards=[{function: exact_match}]",
            f"rollout.prompts_per_iteration={PROMPTS_PER_ITERATION}",
            f"rollout.samples_per_prompt={GROUP}",
            f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
            *rollout,
            f"train.iterations={iterations}",
            f"train.sequences_per_device={sequences}",
            f"train.samples_every={10**6}",
            "advantage.estimator=grpo",
            "policy_loss.agg=token-mean",
            "kl.coef=0",
            f"optim.lr={lr}",
            "optim.schedule=constant",
            "eval.every=1",
            f"logging.every={10**6}",
        ],
    )
    rows = [json.loads(line) for line in (root / "rl.jsonl").read_text().splitlines()]
    started = time.perf_counter()
    trainer = build_pg_trainer(
        cfg,
        threshold_trainer(threshold),
        extra=lambda tokenizer: {"probe": answer_batch(tokenizer, rows)},
    )
    trainer.train()
    reached = trainer.state.stop_reason == "threshold"
    return {
        "samples": trainer.state.step * sequences if reached else None,
        "curve": [round(v, 4) for v in trainer.curve],
        "seconds": round(time.perf_counter() - started, 2),
    }


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975[n - 1] * sd / math.sqrt(n)


def censored(runs: list[dict[str, Any]], budget: int) -> list[float]:
    """Samples to threshold, a run that never reached it counted at the budget."""
    return [float(budget if r["samples"] is None else r["samples"]) for r in runs]


def run_lm(iterations: int, threshold: float, work_dir: str | None = None) -> dict[str, Any]:
    """The whole benchmark (module docstring); returns the results as a dict."""
    from transformers.utils import logging as hf_logging

    from alignkit.models import load_policy

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    budget = iterations * PROMPTS_PER_ITERATION * GROUP
    with tempfile.TemporaryDirectory(prefix="alignkit-tglm-", dir=work_dir) as tmp:
        root = Path(tmp)
        rows = add_rows()
        write_jsonl(root / "rl.jsonl", rows["rl"])
        policy = warm_up(root, "policy", rows["policy"], POLICY_EPOCHS, batch=32)
        teachers = {
            task: warm_up(root, task.replace(" ", "-"), rows[task], TEACHER_EPOCHS)
            for task in TASKS
        }
        warm_up_s = time.perf_counter() - started
        model, tokenizer = load_policy(str(policy))
        probe = answer_batch(tokenizer, rows["rl"])
        start_prob = {"policy": answer_probability(model.eval(), probe)}
        for task, path in teachers.items():
            start_prob[task] = answer_probability(load_policy(str(path))[0].eval(), probe)
        print(
            f"warm-ups {warm_up_s:.0f}s; P(right answer) on the RL prompts: "
            + ", ".join(f"{k} {v:.3f}" for k, v in start_prob.items()),
            flush=True,
        )

        def runs(task: str, method: str, lr: float, seeds: tuple[int, ...]) -> list[dict]:
            alpha = METHODS[method]
            teacher = teachers[task] if alpha is not None else None
            out = []
            for seed in seeds:
                out.append(rl_run(root, policy, teacher, alpha, lr, seed, iterations, threshold))
            return out

        results: dict[str, dict[str, dict[str, Any]]] = {task: {} for task in TASKS}
        for method in METHODS:
            # On-policy sampling never reads the teacher: one set of runs serves both tasks.
            tasks = TASKS[:1] if METHODS[method] is None else TASKS
            for task in tasks:
                tuning = {lr: runs(task, method, lr, TUNE_SEEDS) for lr in LEARNING_RATES}
                by_lr = {lr: interval(censored(r, budget))[0] for lr, r in tuning.items()}
                lr = min(LEARNING_RATES, key=lambda x: by_lr[x])  # ties: the smaller rate
                evaluation = runs(task, method, lr, EVAL_SEEDS)
                samples = censored(evaluation, budget)
                mean, half = interval(samples)
                entry = {
                    "lr": lr,
                    "tuning_mean_by_lr": {f"{k:g}": v for k, v in by_lr.items()},
                    "tuning_runs": {f"{k:g}": v for k, v in tuning.items()},
                    "runs": evaluation,
                    "samples": samples,
                    "mean": mean,
                    "ci95_half_width": half,
                    "reached": sum(r["samples"] is not None for r in evaluation),
                    "seeds": len(evaluation),
                }
                for t in TASKS if METHODS[method] is None else (task,):
                    results[t][method] = entry
                print(
                    f"  {task:22s} {method:17s} lr {lr:g}: {mean:7.0f} ± {half:6.0f} samples, "
                    f"reached {entry['reached']}/{entry['seeds']} "
                    f"({time.perf_counter() - started:4.0f}s)",
                    flush=True,
                )
    return {
        "task": "add, one-digit operands; RL on the 45 carry prompts, reward exact_match",
        "threshold": threshold,
        "iterations": iterations,
        "budget_samples": budget,
        "sequences_per_iteration": PROMPTS_PER_ITERATION * GROUP,
        "learning_rates": list(LEARNING_RATES),
        "tune_seeds": list(TUNE_SEEDS),
        "eval_seeds": list(EVAL_SEEDS),
        "start_answer_probability": start_prob,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }


def lm_table(result: dict[str, Any]) -> str:
    """Markdown table of ``run_lm``'s result; ratios to on-policy are bounds where runs were
    censored at the budget."""
    budget = result["budget_samples"]
    lines = [
        "| task | proposal | tuned lr | samples to threshold (mean ± 95% CI) | median | reached "
        "| collapsed | vs on-policy (means) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, methods in result["results"].items():
        base = methods["on-policy"]
        for method, r in methods.items():
            censored_runs = r["reached"] < r["seeds"]
            bound = "≥ " if censored_runs else ""
            median = statistics.median(r["samples"])
            # With half the runs or more censored the median involves the budget: a bound.
            at_least = 2 * (r["seeds"] - r["reached"]) >= r["seeds"]
            median_text = f"{'≥ ' if at_least else ''}{median:,.0f}"
            # Ended below half its starting probability of the right answer.
            collapsed = sum(run["curve"][-1] < run["curve"][0] / 2 for run in r["runs"])
            ratio = base["mean"] / r["mean"]
            base_censored = base["reached"] < base["seeds"]
            if censored_runs and base_censored:
                ratio_text = "(both censored)"
            elif censored_runs or base_censored:
                ratio_text = f"{'≤' if censored_runs else '≥'} {ratio:.2f}x"
            else:
                ratio_text = f"{ratio:.2f}x"
            lines.append(
                f"| {task} | {method} | {r['lr']:g} | {bound}{r['mean']:,.0f} ± "
                f"{r['ci95_half_width']:,.0f} | {median_text} | {r['reached']}/{r['seeds']} | "
                f"{collapsed}/{r['seeds']} | {ratio_text} |"
            )
    lines.append(
        f"\nBudget {budget:,} samples per run; runs not reaching the threshold count as "
        f"{budget:,}. Collapsed: the run ended below half its starting P(right answer)."
    )
    return "\n".join(lines)
