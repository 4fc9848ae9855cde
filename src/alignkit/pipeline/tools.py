"""Tool stages of a pipeline: one registered function each, ``fn(args, stage_dir) -> metrics``.

A tool reads its ``args`` (references already resolved), may write files under ``stage_dir``,
and returns flat ``{name: number}`` metrics that the pipeline summary shows and later stages can
reference as ``${stages.<stage>.metrics.<name>}``. Adding a tool is writing one function.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignkit.config import atomic_write_text
from alignkit.errors import ConfigError

__all__ = ["TOOLS", "register_tool"]

ToolFn = Callable[[dict[str, Any], Path], dict[str, float]]
TOOLS: dict[str, ToolFn] = {}
#: The number each tool's summary row shows (higher is better unless named in LOWER_IS_BETTER).
TOOL_KEY_METRIC: dict[str, str] = {}


def register_tool(name: str, key_metric: str) -> Callable[[ToolFn], ToolFn]:
    def decorator(fn: ToolFn) -> ToolFn:
        if name in TOOLS:
            raise ValueError(f"tool {name!r} is already registered")
        TOOLS[name] = fn
        TOOL_KEY_METRIC[name] = key_metric
        return fn

    return decorator


def _take(args: dict[str, Any], tool: str, allowed: dict[str, Any]) -> dict[str, Any]:
    unknown = set(args) - set(allowed)
    if unknown:
        raise ConfigError(
            f"tool {tool}: unknown arg(s) {', '.join(sorted(unknown))}; args: {', '.join(allowed)}"
        )
    missing = [k for k, v in allowed.items() if v is ... and k not in args]
    if missing:
        raise ConfigError(f"tool {tool}: missing arg(s) {', '.join(missing)}")
    return {**allowed, **args}


@register_tool("data-synthetic", key_metric="files")
def write_synthetic_data(args: dict[str, Any], stage_dir: Path) -> dict[str, float]:
    """Write the bundled tasks (``alignkit data synthetic``) into ``out`` (default: data); with
    ``chat``, also copies of the SFT and preference files whose prompt is one user message
    (``chat_<name>``, for an instruct model's chat template)."""
    from alignkit.data.synthetic import write_chat_prompt_copies, write_task, write_verifiable_tasks

    a = _take(args, "data-synthetic", {"out": "data", "seed": 0, "chat": False})
    out, seed = Path(a["out"]), int(a["seed"])
    files = write_task(out, seed=seed)
    chat = write_chat_prompt_copies(files) if a["chat"] else {}
    return {"files": float(len(files) + len(chat) + len(write_verifiable_tasks(out, seed=seed)))}


@register_tool("eval-task", key_metric="helpfulness")
def evaluate_on_synthetic_task(args: dict[str, Any], stage_dir: Path) -> dict[str, float]:
    """Judge greedy answers of ``model`` to held-out prompts of the bundled task: helpfulness,
    cost and unsafe rate (the quickstart's table); the answers go to ``stage_dir``.

    ``seed`` is the task's (which prompts are held out), that of the ``max_prompts`` judged
    (a random subset) and that of the ``tiny`` preset's weights; ``chat`` gives each prompt as
    one user message, rendered with the model's chat template."""
    from alignkit.data.synthetic import SyntheticTask
    from alignkit.eval import evaluate_synthetic_task
    from alignkit.models import load_policy
    from alignkit.rollout import SamplingConfig
    from alignkit.rollout.generate import PromptText

    a = _take(
        args,
        "eval-task",
        {"model": ..., "seed": 0, "max_prompts": None, "max_new_tokens": 40, "chat": False},
    )
    seed = int(a["seed"])
    prompts: list[PromptText] = list(SyntheticTask(seed=seed).prompts("heldout"))
    if a["max_prompts"] is not None and int(a["max_prompts"]) < len(prompts):
        keep = sorted(random.Random(seed).sample(range(len(prompts)), int(a["max_prompts"])))
        prompts = [prompts[i] for i in keep]
    if a["chat"]:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    model, tokenizer = load_policy(str(a["model"]), seed=seed)
    result = evaluate_synthetic_task(
        model,
        tokenizer,
        prompts,
        SamplingConfig(max_new_tokens=int(a["max_new_tokens"]), temperature=0.0),
    )
    stage_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"prompt": p, "response": r})
        for p, r in zip(result.prompts, result.responses, strict=True)
    ]
    atomic_write_text(stage_dir / "generations.jsonl", "\n".join(lines) + "\n")
    return dict(result.metrics)


def _flat(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numeric report entries as flat ``a/b`` metrics (lists and texts left out)."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat(value, f"{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


@register_tool("eval-rm", key_metric="accuracy")
def evaluate_reward_model_stage(args: dict[str, Any], stage_dir: Path) -> dict[str, float]:
    """``alignkit eval rm``: a reward or cost model (or ensemble) on preference, safety or
    ratings data; report.json and the calibration and margin PNGs go to ``stage_dir``."""
    from alignkit.data.validate import load_validated
    from alignkit.eval.reward_model import evaluate_reward_model, pairs_from_records
    from alignkit.models.ensemble import load_reward_source

    a = _take(
        args,
        "eval-rm",
        {"model": ..., "data": ..., "format": None, "combination": "mean", "penalty": 0.0},
    )
    loaded = load_validated(Path(a["data"]), a["format"])
    source = load_reward_source(
        Path(a["model"]), combination=a["combination"], penalty=float(a["penalty"])
    )
    pairs = pairs_from_records(
        [r.record for r in loaded.rows], loaded.format, source.kind, str(a["data"])
    )
    report = evaluate_reward_model(source, pairs, stage_dir)
    atomic_write_text(stage_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return _flat(report)


@register_tool("eval-policy", key_metric="synthetic/reward/mean")
def evaluate_policy_stage(args: dict[str, Any], stage_dir: Path) -> dict[str, float]:
    """``alignkit eval policy``: sample from ``model`` on ``prompts`` and report reward, cost
    and length under ``rewards`` (``synthetic`` = the bundled judges, or model directories) and
    KL(pi || ``reference``) on the samples."""
    from alignkit.data.validate import load_validated
    from alignkit.eval.policy import evaluate_policy
    from alignkit.models import load_policy
    from alignkit.models.ensemble import load_reward_source

    a = _take(
        args,
        "eval-policy",
        {
            "model": ...,
            "prompts": ...,
            "rewards": ["synthetic"],
            "reference": None,
            "max_prompts": None,
            "max_new_tokens": 48,
            "seed": 0,
        },
    )
    rows = [r.record["prompt"] for r in load_validated(Path(a["prompts"]), "prompt").rows]
    rows = rows[: int(a["max_prompts"])] if a["max_prompts"] else rows
    sources = [s if s == "synthetic" else load_reward_source(Path(s)) for s in a["rewards"]]
    policy, tokenizer = load_policy(str(a["model"]))
    reference = load_policy(str(a["reference"]))[0] if a["reference"] else None
    report = evaluate_policy(
        policy,
        tokenizer,
        rows,
        sources,
        reference=reference,
        max_new_tokens=int(a["max_new_tokens"]),
        seed=int(a["seed"]),
    )
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return _flat(report)
