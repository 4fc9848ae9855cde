"""Evaluate a policy on prompts (seed 002 §4.3.6): reward, cost and length statistics of its
generations, KL to a reference model, and win rate against a second policy.

Generation is batched with the KV cache (``alignkit.rollout.generate_batched`` over a
``TransformersEngine``) and keeps the sampled token ids, so the KL is computed on exactly the
tokens that were sampled:
``KL(pi || ref) ~ mean over sequences of sum_t (log pi(y_t) - log ref(y_t))`` (the k1
estimator, ``alignkit.ops.kl.kl_estimate``; unbiased only for samples from pi itself, i.e.
temperature 1 without top-k/top-p truncation; seeds/NOTES.md on 002 and 004).

Reward sources (:func:`reward_source`): ``synthetic`` (the bundled task's programmatic judges:
helpfulness as the reward, the safety cost as the cost), a reward/cost model or ensemble
directory (or its run), or any reward function the trainers take (``my_reward.py:fn``,
``module:fn``, a registered name such as ``math_accuracy`` or ``reasoning_gym:<task>``, or a
``{function: ..., options: {...}}`` mapping), called with TRL's arguments and the prompt rows'
other columns; samples a function returns None for are left out of its statistics. The win
rate of policy A over B counts ties as half, with a Wilson 95 % interval.

Reward hacking: with a second policy (``versus``, e.g. the model the policy was trained from),
every source scores both; when a trained reward (a model source) prefers the policy while an
independent judge (``synthetic`` or a reward function) rates it worse, ``disagreements`` says so
(as a pipeline's summary does across its stages, ``pipeline.checks``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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

__all__ = [
    "Generations",
    "disagreements",
    "evaluate_policy",
    "judge",
    "reward_source",
    "sample",
    "sequence_kl",
    "win_rate",
]


@dataclass
class Generations:
    """Sampled responses with their token ids. ``input_ids [N, T]``: the prompt left-padded,
    then the response; ``response_mask [N, T]`` 1 on generated tokens up to and including EOS.
    ``texts`` are the responses stripped; ``completions``, ``rendered`` prompts and the rows'
    ``fields`` are what reward functions get, as in training."""

    prompts: list[Any]
    texts: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    completions: list[str] = field(default_factory=list)
    rendered: list[str] = field(default_factory=list)
    fields: list[dict[str, Any]] = field(default_factory=list)
    prompt_width: int = 0  # the response starts at this column of input_ids


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
    fields: Sequence[Mapping[str, Any]] | None = None,
) -> Generations:
    """One response per prompt from ``alignkit.rollout``'s ``TransformersEngine`` (KV cache,
    shared prefill, finished rows dropped) through ``rollout.generate_batched``, ``batch_size``
    prompts at a time, in the prompts' order; temperature 0 is greedy. ``fields``: each prompt
    row's other columns (for reward functions)."""
    rows = [{**(fields[i] if fields else {}), "prompt": p} for i, p in enumerate(prompts)]
    exp = generate_batched(
        TransformersEngine(model, tokenizer),
        prompts_from_records(rows, tokenizer),
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
        exp.completions,
        exp.prompts,
        exp.row_fields,
        exp.prompt_width,
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


def reward_source(spec: str, device: str | None = None) -> Any:
    """What ``--reward`` names: ``synthetic``; a reward/cost model or ensemble directory (or
    its run: ``models.ensemble.load_reward_source``); else the reward function(s) of a
    trainer's ``rewards:`` entry, given as ``my_reward.py:fn``, ``module:fn``, a registered
    name, or a YAML mapping ``{function: math_accuracy, options: {format: boxed}}``."""
    if spec == "synthetic":
        return spec
    from alignkit.rollout.rewards import build_reward_source

    if spec.lstrip().startswith("{"):
        import yaml

        try:
            entry = yaml.safe_load(spec)
        except yaml.YAMLError as err:
            raise ConfigError(f"--reward {spec!r}: not a YAML mapping: {err}") from None
        source = build_reward_source([entry], device=device)
    elif Path(spec).expanduser().is_dir():
        from alignkit.models.ensemble import load_reward_source

        return load_reward_source(spec, device=device)
    else:
        source = build_reward_source([{"function": spec}], device=device)
    source.name = spec
    return source


def _is_model(source: Any) -> bool:
    """A trained reward or cost model (or ensemble): ``score(prompts, texts)`` and a kind."""
    return not isinstance(source, str) and hasattr(source, "kind") and hasattr(source, "score")


def judge(source: Any, prompts: Sequence[Any], texts: Sequence[str] | Generations) -> dict:
    """``{"reward": [N], "cost": [N]?}``: ``source`` is ``"synthetic"``, a ``RewardEnsemble``
    or ``ModelReward`` (texts suffice), or a reward source of functions (given the
    :class:`Generations`, it sees what it sees in training: TRL's arguments and the rows'
    columns; NaN = not applicable)."""
    gens = texts if isinstance(texts, Generations) else None
    texts = gens.texts if gens is not None else texts
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
    if _is_model(source):
        key = "cost" if source.kind == "cost" else "reward"
        return {key: source.score(list(prompts), list(texts))}
    if gens is None:
        raise ConfigError(f"reward source {source.name!r} scores Generations (sample first)")
    from alignkit.rollout.rewards import RewardContext, score_with_context

    lengths = gens.response_mask.sum(dim=1).tolist()
    ids = gens.input_ids[:, gens.prompt_width :].tolist()
    context = RewardContext(
        prompts=list(prompts),
        completion_ids=[row[:n] for row, n in zip(ids, lengths, strict=True)],
    )
    scores = score_with_context(source, gens.rendered, gens.completions, gens.fields, context)
    return {"reward": scores.float()}


def win_rate(a: Tensor, b: Tensor) -> dict[str, float]:
    """Share of prompts where ``a > b`` (ties half) and its Wilson 95 % interval."""
    wins = float((a > b).sum() + 0.5 * (a == b).sum())
    low, high = wilson_interval(wins, len(a))
    return {"win_rate": wins / len(a), "ci_low": low, "ci_high": high, "n": len(a)}


def _stats(values: Tensor) -> dict[str, float]:
    """Mean, std, min and max over the applicable (not NaN) values; ``scored`` when some
    are not."""
    values = values.double()
    scored = values[~values.isnan()]
    if not len(scored):
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "scored": 0}
    stats = {
        "mean": float(scored.mean()),
        "std": float(scored.std(correction=0)) if len(scored) > 1 else 0.0,
        "min": float(scored.min()),
        "max": float(scored.max()),
    }
    return stats if len(scored) == len(values) else {**stats, "scored": len(scored)}


def disagreements(
    sources: Sequence[Any], mine: Mapping[str, Mapping[str, Tensor]], theirs: Mapping
) -> list[str]:
    """Every (trained model source, judge) pair where the trained reward prefers the policy to
    ``versus`` while the judge rates it worse (reward hacking): ``mine``/``theirs`` are each
    source's scores of the policy's and of ``versus``'s answers."""

    def better(name: str, key: str) -> tuple[float, float, float]:
        a = float(mine[name][key].nanmean())
        b = float(theirs[name][key].nanmean())
        return (a - b) * (1.0 if key == "reward" else -1.0), a, b

    names = [s if isinstance(s, str) else s.name for s in sources]
    trained = [n for s, n in zip(sources, names, strict=True) if _is_model(s)]
    judges = [n for s, n in zip(sources, names, strict=True) if not _is_model(s)]
    found = []
    for t in trained:
        for t_key in mine[t]:
            up, a, b = better(t, t_key)
            if not up > 0:
                continue
            for j in judges:
                for j_key in mine[j]:
                    down, ja, jb = better(j, j_key)
                    if down < 0:
                        found.append(
                            f"possible reward hacking: the trained {t_key} {t} prefers the "
                            f"policy to versus ({a:.3f} vs {b:.3f}) while the judge {j}'s "
                            f"{j_key} rates it worse ({ja:.3f} vs {jb:.3f})"
                        )
    return found


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
    fields: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report: per-source statistics, lengths, KL to ``reference``, win rate vs ``versus``
    (a ``(model, tokenizer)``) under the first source's reward (or lower cost), and the
    sources' ``disagreements`` between the two (reward hacking). ``fields``: each prompt
    row's other columns, for reward functions (``answer``, ...)."""
    settings: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        on_progress=on_progress,
        fields=fields,
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
        scores[name] = judge(source, gens.prompts, gens)
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
        names = [s if isinstance(s, str) else s.name for s in sources]
        theirs = {n: judge(s, other.prompts, other) for s, n in zip(sources, names, strict=True)}
        report["versus"] = {n: {k: _stats(v) for k, v in theirs[n].items()} for n in names}
        mine = scores[names[0]]
        key = "reward" if "reward" in mine else "cost"
        a, b = (mine[key], theirs[names[0]][key])
        a, b = (a, b) if key == "reward" else (-a, -b)
        both = ~(a.isnan() | b.isnan())  # a function's "not applicable" samples left out
        report["win_rate"] = win_rate(a[both], b[both]) | {"judge": f"{names[0]}:{key}"}
        report["disagreements"] = disagreements(sources, scores, theirs)
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
