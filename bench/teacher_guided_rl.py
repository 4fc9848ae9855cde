"""Samples-to-threshold of teacher-guided proposals in a tabular RL simulation.

Called by ``bench/teacher_guided.py rl``. Each run trains a tabular softmax policy (one logit
vector per prompt, 16 prompts, 64 tokens: a one-token answer per prompt, reward 1 for the
right token) by importance-weighted REINFORCE with a leave-one-out baseline:

    θ_p += lr · (1/G) Σ_g min(π(y_g)/q(y_g), C) · (r_g - mean_{g'≠g} r_g') · (e_{y_g} - π_p)

with G = 8 samples per prompt and iteration drawn from the proposal q of the method, built by
the same ``alignkit.ops.proposals`` calls ``TeacherGuidedEngine`` makes: on-policy (q = π),
α by KL symmetry (recomputed every iteration), fixed α = 0.5, and the min-variance proposal
(score = the teacher log-ratio log π_t - log π, floor 0.1). C is the trainer's default cap 2.
"Samples to threshold" counts sampled answers (all prompts) until the mean success
probability over prompts, computed exactly, reaches the threshold; runs that never do are
counted at the budget (a lower bound) and their share is reported.

Tasks (the initial policy's logits are N(0, 2²) per prompt):

- ``teacher knows``: the answer is one of the policy's least likely quarter of tokens
  (initial success probability ~0.1%); the teacher is the policy plus N(0, 0.3²) logit noise,
  with half its mass moved onto the answer.
- ``teacher does not know``: the answer has a modest policy probability (rank 17 of 64);
  the teacher is the policy plus N(0, 0.3²) noise, with half its mass moved onto a wrong token
  of the policy's least likely quarter (it is confident and wrong).

Each method's learning rate is tuned on 5 seeds (lowest mean samples-to-threshold over a
grid); it is then evaluated on 8 other seeds, with a 95% t-interval over them.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from alignkit.ops.proposals import (
    geometric_mixture_logprobs,
    kl_symmetry_alpha,
    min_variance_proposal_logprobs,
)

METHODS = ("on-policy", "α by KL symmetry", "α = 0.5", "min-variance")
TASKS = ("teacher knows", "teacher does not know")
PROMPTS, VOCAB, GROUP = 16, 64, 8
LEARNING_RATES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
TUNE_SEEDS, EVAL_SEEDS = 5, 8
# Two-sided 97.5% quantiles of Student's t, by degrees of freedom.
T_975 = {4: 2.776, 7: 2.365}


def boost(log_probs: Tensor, token: Tensor, share: float = 0.5) -> Tensor:
    """Move mass so that ``token`` (one per row) gets ``share`` of it."""
    chosen = torch.zeros_like(log_probs, dtype=torch.bool).scatter(-1, token[:, None], True)
    inside = log_probs.gather(-1, token[:, None])
    outside = torch.log1p(-inside.exp())
    shift = math.log(share / (1 - share)) + outside - inside
    return torch.log_softmax(torch.where(chosen, log_probs + shift, log_probs), -1)


def make_task(task: str, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Initial policy logits, teacher log-probs, answers; all ``[PROMPTS, ...]``."""
    generator = torch.Generator().manual_seed(seed)
    policy = torch.randn(PROMPTS, VOCAB, generator=generator, dtype=torch.float64) * 2.0
    order = policy.argsort(-1, descending=True)
    rare = order[:, 3 * VOCAB // 4 :]
    pick = torch.randint(0, rare.shape[1], (PROMPTS, 2), generator=generator)
    rare_tokens = rare.gather(-1, pick)
    noise = torch.randn(PROMPTS, VOCAB, generator=generator, dtype=torch.float64) * 0.3
    teacher = torch.log_softmax(policy + noise, -1)
    if task == "teacher knows":
        answer = rare_tokens[:, 0]
        teacher = boost(teacher, answer)
    else:
        answer = order[:, VOCAB // 4]
        teacher = boost(teacher, rare_tokens[:, 1])
    return policy, teacher, answer


def proposal(method: str, logits: Tensor, teacher: Tensor) -> Tensor:
    if method == "on-policy":
        return torch.log_softmax(logits, -1)
    if method == "α by KL symmetry":
        alpha = kl_symmetry_alpha(logits, teacher).alpha
        return geometric_mixture_logprobs(logits, teacher, alpha)
    if method == "α = 0.5":
        return geometric_mixture_logprobs(logits, teacher, 0.5)
    log_policy = torch.log_softmax(logits, -1)
    return min_variance_proposal_logprobs(logits, teacher - log_policy, floor=0.1)


def train(
    method: str, task: str, seeds: list[int], budget: int, threshold: float, max_weight: float
) -> Tensor:
    """Samples to threshold ``[len(seeds), len(LEARNING_RATES)]`` (budget when not reached)."""
    parts = [make_task(task, seed) for seed in seeds]
    lrs = torch.tensor(LEARNING_RATES, dtype=torch.float64)
    rows = len(seeds) * len(lrs) * PROMPTS

    def per_run(x: Tensor) -> Tensor:  # [S, ...] -> [S * L * P, ...]
        return x[:, None].expand(-1, len(lrs), *x.shape[1:]).reshape(rows, *x.shape[2:])

    logits = per_run(torch.stack([p for p, _, _ in parts]))
    teacher = per_run(torch.stack([t for _, t, _ in parts]))
    answer = per_run(torch.stack([a for _, _, a in parts]))
    lr = lrs[None, :, None].expand(len(seeds), -1, PROMPTS).reshape(rows, 1)
    generator = torch.Generator().manual_seed(12345)
    reached = torch.full((len(seeds), len(lrs)), budget, dtype=torch.long)
    per_iteration = PROMPTS * GROUP
    for iteration in range(budget // per_iteration):
        log_policy = torch.log_softmax(logits, -1)
        success = log_policy.gather(-1, answer[:, None]).exp().view(len(seeds), len(lrs), PROMPTS)
        done = (success.mean(-1) >= threshold) & (reached == budget)
        reached = torch.where(done, iteration * per_iteration, reached)
        if bool((reached < budget).all()):
            break
        logq = proposal(method, logits, teacher)
        tokens = torch.multinomial(logq.exp(), GROUP, replacement=True, generator=generator)
        reward = (tokens == answer[:, None]).to(torch.float64)
        baseline = (reward.sum(-1, keepdim=True) - reward) / (GROUP - 1)
        weight = (log_policy.gather(-1, tokens) - logq.gather(-1, tokens)).exp()
        coef = weight.clamp_max(max_weight) * (reward - baseline) / GROUP  # [rows, G]
        # Σ_g coef_g (e_{y_g} - π): scatter the one-hots, subtract π times the sum.
        step = torch.zeros_like(logits).scatter_add_(-1, tokens, coef)
        step = step - log_policy.exp() * coef.sum(-1, keepdim=True)
        logits = logits + lr * step
    return reached


def interval(values: Tensor) -> tuple[float, float]:
    mean = float(values.mean())
    half = T_975[values.numel() - 1] * float(values.std()) / math.sqrt(values.numel())
    return mean, half


def run_rl(budget: int, threshold: float, max_weight: float) -> dict:
    started = time.perf_counter()
    tune = list(range(1000, 1000 + TUNE_SEEDS))
    evaluate = list(range(EVAL_SEEDS))
    results: dict[str, dict[str, dict]] = {}
    for task in TASKS:
        results[task] = {}
        for method in METHODS:
            tuned = train(method, task, tune, budget, threshold, max_weight).double()
            best = int(tuned.mean(0).argmin())
            lr = LEARNING_RATES[best]
            runs = train(method, task, evaluate, budget, threshold, max_weight)[:, best].double()
            mean, half = interval(runs)
            results[task][method] = {
                "lr": lr,
                "tuning_mean_by_lr": dict(
                    zip(map(str, LEARNING_RATES), tuned.mean(0).tolist(), strict=True)
                ),
                "samples": runs.tolist(),
                "mean": mean,
                "ci95_half_width": half,
                "share_reached": float((runs < budget).double().mean()),
            }
            print(
                f"  {task:22s} {method:18s} lr {lr:6g}: {mean:9.0f} ± {half:7.0f} samples "
                f"({time.perf_counter() - started:5.1f}s)",
                flush=True,
            )
    return {
        "budget": budget,
        "threshold": threshold,
        "max_weight": max_weight,
        "seconds": time.perf_counter() - started,
        "results": results,
    }


def rl_table(result: dict) -> str:
    lines = [
        "| task | method | tuned lr | samples to threshold (mean ± 95% CI) | reached | vs on-policy |",
        "|---|---|---|---|---|---|",
    ]
    for task, methods in result["results"].items():
        base = methods["on-policy"]["mean"]
        for method, r in methods.items():
            lines.append(
                f"| {task} | {method} | {r['lr']:g} | {r['mean']:,.0f} ± "
                f"{r['ci95_half_width']:,.0f} | {r['share_reached']:.0%} | "
                f"{base / r['mean']:.2f}x |"
            )
    return "\n".join(lines)
