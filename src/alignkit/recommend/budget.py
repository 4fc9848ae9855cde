"""How much online RL fits in the stated hours: the cost of an iteration, measured on this
machine or modelled from the model's size, and the settings sized to it.

An iteration samples ``B = prompts x samples`` completions of up to ``T = max_new_tokens`` tokens
to prompts of ``Lp`` tokens, then trains on them once (``train.epochs_per_iteration=1``, no KL
reference pass: the recommended configs leave ``kl.coef`` at 0)::

    generation = T * (step_8 + max(0, B - 8) * forward_token)  +  B * Lp * forward_token
    update     = B * (Lp + T) * update_token

``step_8`` is one decode step of 8 sequences (at small batches decoding is bound by reading the
weights and by per-step overhead, not by arithmetic); each sequence beyond 8 adds a forward
token's compute, so large batches are charged as compute-bound. ``update_token`` is a forward,
backward and AdamW step per token; a forward token costs a third of it (the backward pass is
about twice the forward's FLOPs, Kaplan et al. 2020 §2.1).

Measured: the model samples 8 answers to the data's prompts (`sample_answer_lengths`: how long
its answers are, which sizes ``T``), then the recommended config itself runs 2 iterations of 8
sequences on this machine (`time_iterations`), so every overhead of the real trainer and the
reward is in the timings; a larger batch is charged linearly (micro-batches of 8 sequences) and
its decoding as above. Modelled (`model_costs`, when the model is not
given, is too large to load here, or the stated GPUs are not this machine's): 6 FLOPs per
parameter per trained token (4 with LoRA: no weight gradients for the frozen base) at an
assumed share of the machine's rate. Both are printed with the estimate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MEASURE_MAX_PARAMETERS",
    "IterationCost",
    "TokenCosts",
    "max_new_tokens_for",
    "measure_cap",
    "measure_machine",
    "model_costs",
    "prompts_of",
    "sample_answer_lengths",
    "size_online_run",
    "time_iterations",
]

#: Models up to this size are loaded and timed when the run is for this machine.
MEASURE_MAX_PARAMETERS = 2_000_000_000
#: Share of the budget spent iterating; the rest goes to loading, evaluations, checkpoints.
ITERATING_SHARE = 0.85
#: Iterations a run should have at least (optimizer steps: too few and the policy barely moves);
#: the batch shrinks before the iterations do. The newcomer trial learned in 20 iterations of
#: 8 prompts x 4 samples (held-out 13/32 -> 26/32); 100 is the trainers' default.
TARGET_ITERATIONS, MIN_ITERATIONS, MAX_ITERATIONS = 100, 20, 2000
PROMPT_CHOICES = (64, 32, 16, 8, 4)
#: Modelled costs: achieved share of the measured matmul rate (CPU) / of an assumed GPU rate.
CPU_EFFICIENCY = 0.5
ASSUMED_GPU_FLOPS, GPU_EFFICIENCY = 300e12, 0.35  # bf16 dense, a typical MFU
ASSUMED_GPU_BANDWIDTH = 2e12  # bytes/s per GPU
#: Sampling caps when measuring a model's natural answer length (tokens).
MEASURE_CAP_MIN, MEASURE_CAP_MAX = 64, 256


@dataclass(frozen=True)
class TokenCosts:
    """Seconds per unit of work of this model on this machine (see the module docstring)."""

    decode_step_8: float  # one decode step of 8 sequences
    forward_token: float  # forward pass, per token
    update_token: float  # forward + backward + optimizer step, per token
    source: str  # how they were obtained, printed with the estimate
    completion_tokens: tuple[int, ...] = ()  # measured natural lengths of sampled answers
    cap: int | None = None  # the sampling cap those lengths were measured under


@dataclass(frozen=True)
class IterationCost:
    generation_s: float
    update_s: float

    @property
    def total_s(self) -> float:
        return self.generation_s + self.update_s


def iteration_cost(
    costs: TokenCosts, prompts: int, samples: int, prompt_tokens: float, new_tokens: int
) -> IterationCost:
    """Seconds of one iteration (formula in the module docstring)."""
    batch = prompts * samples
    decode = new_tokens * (costs.decode_step_8 + max(0, batch - 8) * costs.forward_token)
    prefill = batch * prompt_tokens * costs.forward_token
    update = batch * (prompt_tokens + new_tokens) * costs.update_token
    return IterationCost(decode + prefill, update)


def max_new_tokens_for(
    answer_tokens_p95: float | None, sampled: Sequence[int] = (), cap: int | None = None
) -> tuple[int, str | None]:
    """``rollout.max_new_tokens`` from the data's answer lengths and, when measured, the lengths
    of the model's own sampled answers (`sample_answer_lengths`, under `cap`); and a note when
    the model did not stop.

    Reference answers (an ``answer`` column) are usually terser than what a chat model writes
    around them, so the cap is 1.25 x the model's 90th-percentile answer when that was
    measured, and at least 2 x the data's 95th percentile + 8; multiples of 8 in [16, 512].
    """
    floor = 2 * answer_tokens_p95 + 8 if answer_tokens_p95 is not None else 64
    wanted, note = floor, None
    lengths = sorted(sampled)
    if lengths and cap:
        capped = sum(length >= cap for length in lengths)
        if capped * 2 > len(lengths):
            note = (
                f"the model did not end {capped} of {len(lengths)} sampled answers within "
                f"{cap} tokens: warm it up with SFT on answers of the wanted form, or its "
                "completions will be cut at rollout.max_new_tokens"
            )
        else:
            p90 = lengths[min(len(lengths) - 1, math.ceil(0.9 * len(lengths)) - 1)]
            wanted = max(floor, 1.25 * p90)
    return int(min(512, max(16, 8 * math.ceil(wanted / 8)))), note


def size_online_run(
    costs: TokenCosts,
    hours: float,
    prompt_tokens: float,
    new_tokens: int,
    group: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prompts, samples and iterations that fit ``hours``: the largest batch that still allows
    ``TARGET_ITERATIONS`` iterations, then as many iterations as fit (at most
    ``MAX_ITERATIONS``). Group methods (GRPO, RLOO) sample 8 per prompt, 4 when even 4
    prompts x 8 do not fit; PPO samples 1. Returns the overrides and the estimate."""
    budget = ITERATING_SHARE * hours * 3600
    sample_choices = (8, 4) if group else (1,)
    chosen = None
    for samples in sample_choices:
        for prompts in PROMPT_CHOICES:
            cost = iteration_cost(costs, prompts, samples, prompt_tokens, new_tokens)
            if budget / cost.total_s >= TARGET_ITERATIONS:
                chosen = (prompts, samples, cost)
                break
        if chosen:
            break
    if chosen is None:  # the smallest batch, with fewer iterations
        prompts, samples = PROMPT_CHOICES[-1], sample_choices[-1]
        chosen = (
            prompts,
            samples,
            iteration_cost(costs, prompts, samples, prompt_tokens, new_tokens),
        )
    prompts, samples, cost = chosen
    iterations = int(min(MAX_ITERATIONS, max(1, budget // cost.total_s)))
    sequences = prompts * samples
    overrides = {
        "rollout.prompts_per_iteration": prompts,
        "rollout.samples_per_prompt": samples,
        "rollout.max_new_tokens": new_tokens,
        "train.iterations": iterations,
        "train.sequences_per_device": math.gcd(sequences, 8),
    }
    estimate = {
        "hours": round(iterations * cost.total_s / 3600, 3),
        "budget_hours": hours,
        "iterations": iterations,
        "seconds_per_iteration": round(cost.total_s, 3),
        "generation_s": round(cost.generation_s, 3),
        "update_s": round(cost.update_s, 3),
        "prompt_tokens": round(prompt_tokens, 1),
        "max_new_tokens": new_tokens,
        "costs": costs.source,
        "too_short": iterations < MIN_ITERATIONS,
    }
    return overrides, estimate


def model_costs(
    parameters: int, lora: bool, gpus: int, flops_per_s: float | None, bandwidth: float | None
) -> TokenCosts:
    """Costs from the model's size and the machine's rate: measured matmul FLOP/s and memory
    bandwidth on this machine, or an assumed GPU's when GPUs are stated (module docstring)."""
    if gpus > 0:
        rate, bytes_per_s = gpus * ASSUMED_GPU_FLOPS * GPU_EFFICIENCY, gpus * ASSUMED_GPU_BANDWIDTH
        source = (
            f"modelled: {gpus} GPU(s) assumed at {ASSUMED_GPU_FLOPS / 1e12:.0f} TFLOP/s bf16 x "
            f"{GPU_EFFICIENCY} utilisation"
        )
        weight_bytes = 2 * parameters
    else:
        rate = CPU_EFFICIENCY * (flops_per_s or 50e9)
        bytes_per_s = bandwidth or 10e9
        source = (
            f"modelled: {CPU_EFFICIENCY} x this machine's measured "
            f"{(flops_per_s or 50e9) / 1e9:.0f} GFLOP/s matmul rate"
        )
        weight_bytes = 4 * parameters
    train_flops = (4 if lora else 6) * parameters
    forward = 2 * parameters / rate
    step_8 = max(8 * forward, weight_bytes / bytes_per_s)
    return TokenCosts(step_8, forward, train_flops / rate, source)


def measure_machine() -> tuple[float, float]:
    """This machine's fp32 matmul FLOP/s and memory copy bandwidth (bytes/s), in about 0.3 s,
    with the threads torch would use for training."""
    import torch

    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        a @ b
        count += 1
    flops = 2 * n**3 * count / (time.perf_counter() - start)
    source, target = torch.ones(64 * 2**20 // 4), torch.zeros(64 * 2**20 // 4)
    target.copy_(source)  # touch every page first: page faults are not bandwidth
    start = time.perf_counter()
    for _ in range(4):
        target.copy_(source)
    bandwidth = 4 * 2 * source.numel() * 4 / (time.perf_counter() - start)  # read + write
    return flops, bandwidth


def measure_cap(answer_tokens_p95: float | None) -> int:
    """The sampling cap when measuring answer lengths: room for 4x what
    `max_new_tokens_for` would give from the data alone, within [64, 256] tokens."""
    floor = 2 * answer_tokens_p95 + 8 if answer_tokens_p95 is not None else 64
    return int(min(MEASURE_CAP_MAX, max(MEASURE_CAP_MIN, 4 * floor)))


def prompts_of(path: Any, limit: int = 8) -> list[Any]:
    """The first `limit` prompts of a data file (text or messages), in file order."""
    from alignkit.data.loaders import read_rows

    prompts = []
    for row in read_rows(path):
        value = row.value.get("prompt") if isinstance(row.value, dict) else None
        if row.error is None and value is not None:
            prompts.append(value)
        if len(prompts) == limit:
            break
    return prompts


def sample_answer_lengths(
    model_name: str, prompts: Sequence[Any], lora: bool, cap: int, temperature: float = 1.0
) -> tuple[int, ...]:
    """Token lengths of 8 answers the model samples (``temperature``, at most ``cap`` tokens) to
    the data's first prompts: how long its answers are before any training."""
    from alignkit.models import LoraSettings, load_policy
    from alignkit.rollout import SamplingConfig, generate_responses

    model, tokenizer = load_policy(
        model_name, lora=LoraSettings(r=16, alpha=32) if lora else None, seed=0
    )
    chosen = [prompts[i % len(prompts)] for i in range(8)]  # a short file's prompts repeat
    sampling = SamplingConfig(max_new_tokens=cap, temperature=temperature)
    texts = generate_responses(
        model, tokenizer, chosen, sampling, prompts_per_batch=8, generator_seed=0
    )
    return tuple(min(cap, len(tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts)


def time_iterations(
    config_class: type,
    entry_point: Any,
    overrides: Sequence[str],
    samples: int,
    prompt_tokens: float,
    new_tokens: int,
    lengths: tuple[int, ...],
    cap: int,
) -> TokenCosts:
    """Run the recommended config itself for 2 iterations of 8 sequences on this machine (in a
    temporary directory) and read its stage timings: rollout and reward of 8 sequences, and
    their update, from the second iteration (the first warms up)."""
    import tempfile

    from alignkit.config import load_config
    from alignkit.tracking import read_metrics

    with tempfile.TemporaryDirectory(prefix="alignkit-recommend-") as tmp:
        cfg = load_config(
            config_class,
            None,
            [
                *overrides,
                f"rollout.prompts_per_iteration={8 // samples}",
                f"rollout.samples_per_prompt={samples}",
                f"rollout.max_new_tokens={new_tokens}",
                "train.iterations=2",
                "train.sequences_per_device=8",
                "train.sequences_per_minibatch=null",
                "data.eval_file=null",
                "eval.every=null",
                "logging.every=1",
                "logging.progress_bar=false",
                "logging.plots=false",
                "logging.report_to=[jsonl]",
                f"output_dir={tmp}",
                "run_name=measure",
            ],
        )
        entry_point(cfg)
        last = read_metrics(Path(tmp) / "measure" / "metrics.jsonl")[-1]
    update = float(last["timing/update"])
    rollout = float(last["timing/iteration"]) - update
    answered = float(last.get("response_length/mean", new_tokens))
    update_token = update / (8 * (prompt_tokens + answered))
    return TokenCosts(
        decode_step_8=rollout / new_tokens,
        forward_token=update_token / 3,
        update_token=update_token,
        source=(
            f"measured on this machine: 2 iterations of the recommended config at 8 sequences, "
            f"rollout and reward {rollout:.2f} s, update {update:.2f} s"
        ),
        completion_tokens=lengths,
        cap=cap,
    )
