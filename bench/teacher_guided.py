"""Seed 001 (the optimal sampling distribution) checked with ``alignkit.ops.proposals``.

    PYTHONPATH=src .venv/bin/python bench/teacher_guided.py theory [--scale 1.0] [--seed 0]
    PYTHONPATH=src .venv/bin/python bench/teacher_guided.py rl [--max-weight 2] [--budget N]
    PYTHONPATH=src .venv/bin/python bench/teacher_guided.py lm [--iterations 80] [--threshold 0.15]

``theory``: random policy/target pairs (one next-token distribution each) in several regimes
and vocabulary sizes up to 50,257, all rows of a cell computed at once in float64. For each
pair it measures Theorem 1 (the second-order expansion against ``exact_progress``),
Theorem 2 (the step η* = Φ1/Φ2 against the best exact step), the KL-symmetric and the
SNR-optimal α (how far apart, how much SNR α_KL loses, how often α_SNR = 1) and two
sample-efficiency proxies against on-policy sampling: the seed's own (the ratio of the best
second-order progress, SNR(q)²/SNR(π_θ)²) and the exact variance of an importance-sampled
policy gradient (``policy_gradient_variance``) for q_αKL, q_0.5 and the variance-optimal
proposal. Prints markdown tables and writes ``bench/results/teacher_guided_theory.json``.
``--scale`` multiplies the number of pairs per cell.

``rl``: samples-to-threshold of on-policy, α_KL, α = 0.5 and min-variance proposals in a tabular
importance-weighted REINFORCE simulation (``bench/teacher_guided_rl.py`` describes it); writes
``bench/results/teacher_guided_rl_cap<C>.json``.

``lm``: samples-to-threshold of the same four proposals training the tiny preset with GRPO
through ``TeacherGuidedEngine`` (``bench/teacher_guided_lm.py`` describes it); writes
``bench/results/teacher_guided_lm.json``. Results and verdicts: docs/teacher-guided-sampling.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from alignkit.config import atomic_write_text
from alignkit.ops.proposals import (
    exact_progress,
    geometric_mixture_logprobs,
    kl_symmetry_alpha,
    min_variance_proposal_logprobs,
    policy_gradient_variance,
    progress_terms,
    snr_alpha,
)

RESULTS = Path(__file__).parent / "results" / "teacher_guided_theory.json"
VOCABS = (16, 256, 4096, 50257)
# Pairs per cell at --scale 1: fewer for large vocabularies (the SNR search costs ~90 passes).
PAIRS = {16: 512, 256: 256, 4096: 64, 50257: 16}
# Rows per block, so that [rows, grid, V] temporaries (SNR search, step grids) stay ~70 MB.
BLOCK_ELEMENTS = 1 << 17
# Theorem 1 is checked at η = c / sd_πθ(g): c is the step in units of the update's spread.
STEPS = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0)
# Theorem 2: the best exact step is searched on η*·2^k, k on this grid.
STEP_GRID = torch.linspace(-8.0, 8.0, 81, dtype=torch.float64)
MIN_VARIANCE_FLOOR = 0.1

Pair = tuple[Tensor, Tensor]


def gaussian(scale: float) -> Callable[[torch.Generator, int, int], Pair]:
    def make(generator: torch.Generator, rows: int, vocab: int) -> Pair:
        shape = (rows, vocab)
        policy = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
        target = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
        return policy, target

    return make


def close(generator: torch.Generator, rows: int, vocab: int) -> Pair:
    policy = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2.0
    noise = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 0.3
    return policy, policy + noise


def log_dirichlet(generator: torch.Generator, rows: int, vocab: int, c: float) -> Tensor:
    """log of Dirichlet(c) samples without underflow: Gamma(c) = Gamma(c + 1)·U^(1/c)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    gamma = torch.from_numpy(rng.gamma(c + 1.0, size=(rows, vocab)))
    uniform = torch.from_numpy(rng.random((rows, vocab))).clamp_min(1e-300)
    return gamma.log() + uniform.log() / c


def dirichlet(c: float) -> Callable[[torch.Generator, int, int], Pair]:
    def make(generator: torch.Generator, rows: int, vocab: int) -> Pair:
        return log_dirichlet(generator, rows, vocab, c), log_dirichlet(generator, rows, vocab, c)

    return make


def rare_mass(generator: torch.Generator, rows: int, vocab: int) -> Pair:
    """The target moves half its mass onto k = max(1, V/100) tokens drawn from the policy's
    least likely half (policy mass there ~1e-3 or less); elsewhere it is the policy plus a
    little noise: the teacher knows answers the policy rarely samples."""
    policy = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2.0
    target = policy + torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 0.3
    k = max(1, vocab // 100)
    unlikely = policy.argsort(-1)[:, : max(k, vocab // 2)]
    pick = torch.rand(unlikely.shape, generator=generator).argsort(-1)[:, :k]
    chosen = torch.zeros_like(policy, dtype=torch.bool).scatter(-1, unlikely.gather(-1, pick), True)
    log_target = torch.log_softmax(target, -1)
    inside = torch.logsumexp(log_target.masked_fill(~chosen, -math.inf), -1, keepdim=True)
    outside = torch.log1p(-inside.exp())
    # Shift the chosen tokens by δ so that their share becomes 1/2: e^δ·s = 1 - s.
    return policy, torch.where(chosen, log_target + outside - inside, log_target)


REGIMES: dict[str, Callable[[torch.Generator, int, int], Pair]] = {
    "close (target = policy + N(0, 0.3²) logit noise)": close,
    "far, Gaussian logits, T = 2 (sd 0.5)": gaussian(0.5),
    "far, Gaussian logits, T = 1 (sd 1)": gaussian(1.0),
    "far, Gaussian logits, T = 0.5 (sd 2)": gaussian(2.0),
    "rare: target puts 1/2 on tokens the policy rarely samples": rare_mass,
    "far, Dirichlet(0.1) (peaked)": dirichlet(0.1),
    "far, Dirichlet(1) (flat)": dirichlet(1.0),
}


def snr_of(log_policy: Tensor, log_target: Tensor, logq: Tensor) -> Tensor:
    phi1, phi2 = progress_terms(log_policy, log_target, logq)
    return phi1.abs() / phi2.sqrt()


def measure_cell(policy: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Every per-pair number of one (regime, vocabulary) cell, as ``[rows]`` tensors."""
    log_policy, log_target = torch.log_softmax(policy, -1), torch.log_softmax(target, -1)
    symmetry = kl_symmetry_alpha(policy, target)
    alpha_kl = symmetry.alpha
    alpha_snr, snr_best = snr_alpha(policy, target)
    logq_kl = geometric_mixture_logprobs(policy, target, alpha_kl)
    logq_half = geometric_mixture_logprobs(policy, target, 0.5)
    snr_kl = snr_of(log_policy, log_target, logq_kl)
    snr_on = snr_of(log_policy, log_target, log_policy)
    snr_half = snr_of(log_policy, log_target, logq_half)

    # Theorem 1 at q = q_αKL, with η in units of sd_πθ(g).
    phi1, phi2 = progress_terms(log_policy, log_target, logq_kl)
    spread = phi2.sqrt()
    out: dict[str, Tensor] = {}
    for c in STEPS:
        eta = c / spread
        exact = exact_progress(log_policy, log_target, logq_kl, None, eta)
        quadratic = eta * phi1 - eta**2 / 2 * phi2
        out[f"thm1_relerr@{c:g}"] = (exact - quadratic).abs() / exact.abs()
        out[f"thm1_linear_relerr@{c:g}"] = (exact - eta * phi1).abs() / exact.abs()
    # The remainder's leading term is -η³κ3/6 (κ3: third central moment of g under π_θ).
    g = (log_policy - logq_kl).exp() * (log_target - log_policy)
    p = log_policy.exp()
    kappa3 = (p * (g - (p * g).sum(-1, keepdim=True)) ** 3).sum(-1)
    eta = 1e-2 / spread
    remainder = exact_progress(log_policy, log_target, logq_kl, None, eta) - (
        eta * phi1 - eta**2 / 2 * phi2
    )
    out["thm1_third_order_ratio"] = remainder / (-(eta**3) * kappa3 / 6)

    # Theorem 2: the second-order optimal step against the best exact step.
    eta_star = phi1 / phi2
    at_star = exact_progress(log_policy, log_target, logq_kl, None, eta_star)
    etas = eta_star.unsqueeze(-1) * torch.exp2(STEP_GRID)  # [rows, K]
    grid = exact_progress(
        log_policy.unsqueeze(-2), log_target.unsqueeze(-2), logq_kl.unsqueeze(-2), None, etas
    )
    best, where = grid.max(-1)
    out["thm2_exact_over_predicted"] = at_star / (phi1.square() / (2 * phi2))
    out["thm2_exact_star_over_best"] = at_star / best
    out["thm2_best_eta_over_star"] = torch.exp2(STEP_GRID[where])

    # Exact best progress on a step grid around each proposal's own η*, vs on-policy.
    def best_exact(logq: Tensor) -> Tensor:
        f1, f2 = progress_terms(log_policy, log_target, logq)
        steps = (f1 / f2).unsqueeze(-1) * torch.exp2(STEP_GRID)
        return exact_progress(
            log_policy.unsqueeze(-2), log_target.unsqueeze(-2), logq.unsqueeze(-2), None, steps
        ).amax(-1)

    best_on = best_exact(log_policy)

    # A proper sampled learner: exact variance of the IS policy gradient for A = log π_t/π_θ.
    scores = log_target - log_policy
    logq_mv = min_variance_proposal_logprobs(policy, scores, floor=MIN_VARIANCE_FLOOR)
    var_on = policy_gradient_variance(log_policy, log_policy, scores)
    out.update(
        alpha_kl=alpha_kl,
        kl_residual=symmetry.delta.abs(),
        kl_flagged=symmetry.flagged.to(torch.float64),
        alpha_snr=alpha_snr,
        alpha_gap=(alpha_snr - alpha_kl).abs(),
        snr_lost_at_kl=1 - snr_kl / snr_best,
        snr_on_over_best=snr_on / snr_best,
        seed_eff_kl=(snr_kl / snr_on).square(),
        seed_eff_half=(snr_half / snr_on).square(),
        exact_eff_kl=best_exact(logq_kl) / best_on,
        exact_eff_half=best_exact(logq_half) / best_on,
        is_eff_kl=var_on / policy_gradient_variance(log_policy, logq_kl, scores),
        is_eff_half=var_on / policy_gradient_variance(log_policy, logq_half, scores),
        is_eff_min_variance=var_on / policy_gradient_variance(log_policy, logq_mv, scores),
        is_eff_target=var_on / policy_gradient_variance(log_policy, log_target, scores),
    )
    return out


def summary(values: Tensor) -> dict[str, float]:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return {"median": math.nan, "p10": math.nan, "p90": math.nan, "n": 0}
    q = torch.quantile(finite, torch.tensor([0.1, 0.5, 0.9], dtype=finite.dtype)).tolist()
    return {"p10": q[0], "median": q[1], "p90": q[2], "n": int(finite.numel())}


def share(mask: Tensor) -> float:
    return float(mask.to(torch.float64).mean())


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.1e}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_theory(scale: float, seed: int) -> dict:
    started = time.perf_counter()
    cells: list[dict] = []
    pooled: dict[str, list[Tensor]] = {}
    for r, (regime, make) in enumerate(REGIMES.items()):
        for vocab in VOCABS:
            rows = max(4, round(PAIRS[vocab] * scale))
            generator = torch.Generator().manual_seed(seed * 1000 + r * 10 + VOCABS.index(vocab))
            policy, target = make(generator, rows, vocab)
            block = max(1, BLOCK_ELEMENTS // vocab)
            parts = [
                measure_cell(p, t)
                for p, t in zip(policy.split(block), target.split(block), strict=False)
            ]
            values = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
            for key, value in values.items():
                pooled.setdefault(key, []).append(value)
            cells.append({"regime": regime, "vocab": vocab, "pairs": rows, "values": values})
            print(
                f"  {regime[:40]:40s} V={vocab:6d} pairs={rows:4d} "
                f"{time.perf_counter() - started:6.1f}s",
                flush=True,
            )
    every = {key: torch.cat(parts) for key, parts in pooled.items()}

    # Table 1: Theorem 1, all pairs pooled.
    t1 = [
        [
            fmt(c),
            fmt(summary(every[f"thm1_relerr@{c:g}"])["median"]),
            fmt(summary(every[f"thm1_relerr@{c:g}"])["p90"]),
            fmt(share(every[f"thm1_relerr@{c:g}"] < 0.01)),
            fmt(summary(every[f"thm1_linear_relerr@{c:g}"])["median"]),
        ]
        for c in STEPS
    ]
    table1 = table(
        ["η·sd(g)", "median rel. err", "90th pct", "share < 1%", "first order only: median"], t1
    )
    third = summary(every["thm1_third_order_ratio"])
    t2_rows = [
        [
            name,
            fmt(summary(every[key])["p10"]),
            fmt(summary(every[key])["median"]),
            fmt(summary(every[key])["p90"]),
        ]
        for name, key in (
            ("exact P(η*) / predicted Φ1²/(2Φ2)", "thm2_exact_over_predicted"),
            ("exact P(η*) / best exact P", "thm2_exact_star_over_best"),
            ("best exact η / η*", "thm2_best_eta_over_star"),
        )
    ]
    table2 = table(["quantity (q = q_αKL, all pairs)", "10th pct", "median", "90th pct"], t2_rows)

    alpha_rows, eff_rows, json_cells = [], [], []
    for cell in cells:
        v = cell["values"]
        label = [
            cell["regime"].split(" (")[0].split(":")[0],
            str(cell["vocab"]),
            str(cell["pairs"]),
        ]
        alpha_rows.append(
            [
                *label,
                fmt(summary(v["alpha_kl"])["median"]),
                fmt(share(v["alpha_snr"] >= 1.0)),
                fmt(summary(v["alpha_gap"])["median"]),
                fmt(share(v["alpha_gap"] < 0.1)),
                fmt(summary(v["snr_lost_at_kl"])["median"]),
                fmt(share(v["snr_lost_at_kl"] < 0.05)),
                fmt(float(v["kl_residual"].max())),
            ]
        )
        eff_rows.append(
            [
                *label,
                fmt(summary(v["seed_eff_kl"])["median"]),
                fmt(summary(v["exact_eff_kl"])["median"]),
                fmt(summary(v["exact_eff_half"])["median"]),
                fmt(summary(v["is_eff_kl"])["median"]),
                fmt(summary(v["is_eff_half"])["median"]),
                fmt(summary(v["is_eff_min_variance"])["median"]),
                fmt(share(v["is_eff_kl"] >= 2.0)),
            ]
        )
        json_cells.append(
            {
                "regime": cell["regime"],
                "vocab": cell["vocab"],
                "pairs": cell["pairs"],
                **{key: summary(value) for key, value in v.items()},
                "share_alpha_snr_is_1": share(v["alpha_snr"] >= 1.0),
                "share_alpha_gap_below_0.1": share(v["alpha_gap"] < 0.1),
                "share_snr_lost_below_5pct": share(v["snr_lost_at_kl"] < 0.05),
                "share_is_eff_kl_at_least_2": share(v["is_eff_kl"] >= 2.0),
            }
        )
    table3 = table(
        [
            "regime",
            "V",
            "pairs",
            "α_KL median",
            "share α_SNR = 1",
            "median abs(α_SNR - α_KL)",
            "share < 0.1",
            "SNR lost at α_KL, median",
            "share < 5%",
            "max abs Δ(α_KL)",
        ],
        alpha_rows,
    )
    table4 = table(
        [
            "regime",
            "V",
            "pairs",
            "seed: SNR² ratio α_KL",
            "exact best P α_KL",
            "exact best P α=0.5",
            "IS var. ratio α_KL",
            "IS var. ratio α=0.5",
            "IS var. ratio min-variance q",
            "share α_KL ≥ 2x",
        ],
        eff_rows,
    )
    pairs_total = sum(cell["pairs"] for cell in cells)
    overall = {
        "pairs": pairs_total,
        "share_alpha_snr_is_1": share(every["alpha_snr"] >= 1.0),
        "share_alpha_gap_below_0.1": share(every["alpha_gap"] < 0.1),
        "share_snr_lost_below_5pct": share(every["snr_lost_at_kl"] < 0.05),
        "max_kl_residual": float(every["kl_residual"].max()),
        "share_kl_flagged": share(every["kl_flagged"] > 0),
        "thm1_third_order_ratio": third,
        "share_is_eff_kl_at_least_2": share(every["is_eff_kl"] >= 2.0),
        "share_is_eff_min_variance_at_least_1": share(every["is_eff_min_variance"] >= 1.0),
        **{key: summary(value) for key, value in every.items()},
    }
    seconds = time.perf_counter() - started
    print(f"\n{pairs_total} pairs in {seconds:.0f} s (float64, {torch.get_num_threads()} threads)")
    print("\n### Theorem 1: exact progress vs the second-order expansion (q = q_αKL)\n")
    print(table1)
    print(
        f"\nremainder / (-η³κ3/6) at η·sd(g) = 0.01: median {fmt(third['median'])}, "
        f"10-90th pct {fmt(third['p10'])}-{fmt(third['p90'])}"
    )
    print("\n### Theorem 2: the second-order step η* = Φ1/Φ2 against the exact progress\n")
    print(table2)
    print("\n### α_SNR against α_KL (seed §5.4)\n")
    print(table3)
    print(
        f"\nall pairs: α_SNR = 1 in {overall['share_alpha_snr_is_1']:.1%}; "
        f"abs(α_SNR - α_KL) < 0.1 in {overall['share_alpha_gap_below_0.1']:.1%}; "
        f"SNR lost at α_KL < 5% in {overall['share_snr_lost_below_5pct']:.1%}"
    )
    print("\n### Sample-efficiency proxies against on-policy sampling (medians; > 1 = better)\n")
    print(table4)
    result = {
        "command": f"bench/teacher_guided.py theory --scale {scale} --seed {seed}",
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "steps_eta_times_sd": list(STEPS),
        "min_variance_floor": MIN_VARIANCE_FLOOR,
        "overall": overall,
        "cells": json_cells,
        "tables": {"theorem1": table1, "theorem2": table2, "alpha": table3, "efficiency": table4},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    theory = sub.add_parser("theory", help="seed 001's numerical claims on random pairs")
    theory.add_argument("--scale", type=float, default=1.0, help="multiplies pairs per cell")
    theory.add_argument("--seed", type=int, default=0)
    rl = sub.add_parser("rl", help="samples-to-threshold in a tabular RL simulation")
    rl.add_argument("--budget", type=int, default=200_000, help="sampled answers per run")
    rl.add_argument("--threshold", type=float, default=0.8, help="mean success probability")
    rl.add_argument("--max-weight", type=float, default=2.0, help="importance-weight cap C")
    lm = sub.add_parser("lm", help="samples-to-threshold training the tiny LM with GRPO")
    lm.add_argument("--iterations", type=int, default=80, help="GRPO iterations per run (budget)")
    lm.add_argument("--threshold", type=float, default=0.15, help="mean P(right answer)")
    args = parser.parse_args()
    if args.command == "theory":
        run_theory(args.scale, args.seed)
    elif args.command == "lm":
        from teacher_guided_lm import lm_table, run_lm

        result = run_lm(args.iterations, args.threshold)
        table = lm_table(result)
        print(f"\n{table}")
        path = RESULTS.with_name("teacher_guided_lm.json")
        atomic_write_text(path, json.dumps({**result, "table": table}, indent=1) + "\n")
        print(f"\nwrote {path}")
    else:
        from teacher_guided_rl import rl_table, run_rl

        result = run_rl(args.budget, args.threshold, args.max_weight)
        table = rl_table(result)
        print(f"\n{table}")
        path = RESULTS.with_name(f"teacher_guided_rl_cap{args.max_weight:g}.json")
        atomic_write_text(path, json.dumps({**result, "table": table}, indent=1) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
