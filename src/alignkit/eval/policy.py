"""Evaluate a policy on prompts (seed 002 §4.3.6): reward, cost and length statistics of its
generations, KL to a reference model, and win rate against a second policy.

Generation is batched with the KV cache (``alignkit.rollout.generate_batched`` over a
``TransformersEngine``) and keeps the sampled token ids, so the KL is computed on exactly the
tokens that were sampled:
``KL(pi || ref) ~ mean over sequences of sum_t (log pi(y_t) - log ref(y_t))`` (the k1
estimator, ``alignkit.ops.kl.kl_estimate``; unbiased only for samples from pi itself, i.e.
temperature 1 without top-k/top-p truncation; seeds/NOTES.md on 002 and 004).

Reward sources: ``synthetic`` (the bundled task's programmatic judges: helpfulness as the
reward, the safety cost as the cost) or a reward/cost model or ensemble directory. The win
rate of policy A over B counts ties as half, with a Wilson 95 % interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.ops.evaluation import wilson_interval
from alignkit.ops.kl import kl_estimate
from alignkit.ops.stats import masked_sum
from alignkit.rollout import (
    SamplingConfig,
    TransformersEngine,
    generate_batched,
    prompts_from_records,
)

__all__ = ["Generations", "evaluate_policy", "judge", "sample", "sequence_kl", "win_rate"]


@dataclass
class Generations:
    """Sampled responses with their token ids. ``input_ids [N, T]``: the prompt left-padded,
    then the response; ``response_mask [N, T]`` 1 on generated tokens up to and including EOS."""

    prompts: list[Any]
    texts: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens


def sample(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Generations:
    """One response per prompt from ``alignkit.rollout``'s ``TransformersEngine`` (KV cache,
    shared prefill, finished rows dropped) through ``rollout.generate_batched``, ``batch_size``
    prompts at a time, in the prompts' order; temperature 0 is greedy."""
    exp = generate_batched(
        TransformersEngine(model, tokenizer),
        prompts_from_records([{"prompt": p} for p in prompts], tokenizer),
        SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
        prompts_per_batch=batch_size,
        generator=torch.Generator().manual_seed(seed),  # CPU uniforms drive any device
        on_progress=on_progress,
    ).to("cpu")
    return Generations(
        list(prompts),
        [t.strip() for t in exp.completions],
        exp.input_ids,
        exp.attention_mask,
        exp.response_mask,
        exp.truncated,
    )


@torch.no_grad()
def sequence_kl(
    policy: nn.Module, reference: nn.Module, gens: Generations, batch_size: int = 32
) -> Tensor:
    """``[N]`` k1 estimate of each sequence's KL(pi || ref): ``sum_t log pi(y_t) - log ref(y_t)``
    over the sampled response tokens (one teacher-forced forward per model and batch)."""
    from alignkit.models.forward import token_logprobs

    out = []
    for start in range(0, len(gens.texts), batch_size):
        part = slice(start, start + batch_size)
        batch = {"input_ids": gens.input_ids[part], "attention_mask": gens.attention_mask[part]}
        mask = gens.response_mask[part]
        logps = []
        for model in (policy, reference):
            device = next(model.parameters()).device
            on_device = {k: v.to(device) for k, v in batch.items()}
            logps.append(token_logprobs(model, on_device, mask.to(device)).float().cpu())
        out.append(masked_sum(kl_estimate(logps[0], logps[1], "k1"), mask.float(), dim=1))
    return torch.cat(out)


def judge(source: Any, prompts: Sequence[Any], texts: Sequence[str]) -> dict[str, Tensor]:
    """``{"reward": [N], "cost": [N]?}``: ``source`` is ``"synthetic"`` or a ``RewardEnsemble``."""
    if source == "synthetic":
        from alignkit.data.synthetic import helpfulness_score, safety_cost

        # string judges: one call per response is what they are
        pairs = list(zip(prompts, texts, strict=True))
        try:
            return {
                "reward": torch.tensor([helpfulness_score(p, t) for p, t in pairs]),
                "cost": torch.tensor([safety_cost(p, t) for p, t in pairs]),
            }
        except ValueError as exc:  # a prompt that is not one of the bundled task's
            raise ConfigError(
                f"reward source 'synthetic' judges the bundled task only: {exc}"
            ) from None
    key = "cost" if source.kind == "cost" else "reward"
    return {key: source.score(list(prompts), list(texts))}


def win_rate(a: Tensor, b: Tensor) -> dict[str, float]:
    """Share of prompts where ``a > b`` (ties half) and its Wilson 95 % interval."""
    wins = float((a > b).sum() + 0.5 * (a == b).sum())
    low, high = wilson_interval(wins, len(a))
    return {"win_rate": wins / len(a), "ci_low": low, "ci_high": high, "n": len(a)}


def _stats(values: Tensor) -> dict[str, float]:
    values = values.double()
    return {
        "mean": float(values.mean()),
        "std": float(values.std(correction=0)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
    }


def evaluate_policy(
    policy: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    sources: Sequence[Any],
    *,
    reference: nn.Module | None = None,
    versus: tuple[nn.Module, Any] | None = None,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The report: per-source statistics, lengths, KL to ``reference``, win rate vs ``versus``
    (a ``(model, tokenizer)``) under the first source's reward (or lower cost)."""
    settings: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        on_progress=on_progress,
    )
    gens = sample(policy, tokenizer, prompts, seed=seed, **settings)
    lengths = gens.response_mask.sum(dim=1).double()
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "length_tokens": _stats(lengths),
        "truncated_share": float(gens.truncated.double().mean()),
        "examples": [
            {"prompt": p, "response": t} for p, t in zip(prompts[:3], gens.texts[:3], strict=False)
        ],
    }
    scores: dict[str, dict[str, Tensor]] = {}
    for source in sources:
        name = source if isinstance(source, str) else source.name
        scores[name] = judge(source, gens.prompts, gens.texts)
        report[name] = {key: _stats(value) for key, value in scores[name].items()}
    if reference is not None:
        kl = sequence_kl(policy, reference, gens, batch_size)
        report["kl_k1"] = {
            "per_sequence": float(kl.mean()),
            "per_token": float(kl.sum() / lengths.sum().clamp(min=1)),
        }
        if temperature != 1.0:
            report["kl_k1"]["note"] = "biased: samples not drawn at temperature 1"
    if versus is not None and sources:
        model_b, tokenizer_b = versus
        other = sample(model_b, tokenizer_b, prompts, seed=seed, **settings)
        first = sources[0]
        name = first if isinstance(first, str) else first.name
        mine = scores[name]
        theirs = judge(first, other.prompts, other.texts)
        key = "reward" if "reward" in mine else "cost"
        a, b = (mine[key], theirs[key]) if key == "reward" else (-mine[key], -theirs[key])
        report["win_rate"] = win_rate(a, b) | {"judge": f"{name}:{key}"}
    return _finite(report)


def _finite(value: Any) -> Any:
    # JSON has no NaN: a metric that cannot be computed is null
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
