"""`alignkit train rm-ensemble`: K reward (or cost) models in one run directory (exercise 4.3).

Each member is an ordinary ``RewardTrainer`` run in ``<run>/member-k/`` on its own data:
a bootstrap resample of the training rows (``resample: bootstrap``, drawn with replacement by
``seed + k``), a disjoint shard (``shards``), or all rows with another seed (``seeds``). Every
member evaluates on ``data.eval_file`` and stops early on ``eval/accuracy``; its checkpoint of
best validation accuracy is kept (checkpoints are saved at every evaluation, the best one is
picked from the trainer's early-stopping record and the others but the newest are deleted).

``<run>/ensemble.json`` lists the members (see ``alignkit.models.ensemble``); with
``ensemble.stacking_file`` (held-out pairs, not the early-stopping data) the stacking weights
are fitted there. ``<run>/summary.json`` has each member's summary and the ensemble's
held-out accuracy under every combination.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

from alignkit.config import atomic_write_text
from alignkit.errors import CheckpointError, ConfigError
from alignkit.trainers.reward import RewardConfig, train_reward
from alignkit.trainers.reward_config import EnsembleConfig, EnsembleSettings

__all__ = ["EnsembleConfig", "EnsembleSettings", "train_rm_ensemble"]


_CLI_FORMAT = {"preference": "preference", "safety_preference": "safety"}


def _member_rows(cfg: EnsembleConfig, rows: list[dict[str, Any]], k: int) -> list[dict]:
    settings = cfg.ensemble
    if settings.resample == "seeds":
        return rows
    rng = random.Random(cfg.seed * 1_000_003 + k)
    if settings.resample == "bootstrap":
        return [rows[rng.randrange(len(rows))] for _ in rows]
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    return [rows[i] for i in order[k :: settings.members]]


def _member_config(cfg: EnsembleConfig, root: Path, k: int, train_file: str) -> RewardConfig:
    values = {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(RewardConfig)}
    member = RewardConfig(**values)
    member.output_dir, member.run_name = str(root), f"member-{k}"
    member.seed = cfg.seed + k
    member.data.train_file = train_file
    # a checkpoint at every evaluation, all kept, so the best one exists when training ends
    member.checkpoint.every = member.eval.every
    member.checkpoint.keep_last = None
    return member


def _keep_best(run_dir: Path, summary: dict[str, Any]) -> tuple[Path, float | None]:
    from alignkit.tracking.checkpoint import checkpoint_step, list_checkpoints

    best = summary.get("best") or {}
    step = best.get("step")
    checkpoints = list_checkpoints(run_dir)
    chosen = next((c for c in checkpoints if checkpoint_step(c) == step), None)
    if chosen is None:
        raise CheckpointError(f"{run_dir}: no checkpoint at the best step {step}")
    for path in checkpoints[:-1]:
        if path != chosen:
            shutil.rmtree(path)
    value = best.get("value")
    return chosen / "model", None if value is None else float(value)


def train_rm_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Train the members one after another; returns the ensemble's summary."""
    from alignkit.data.output import write_rows
    from alignkit.data.validate import load_validated

    root = Path(cfg.output_dir) / cfg.run_name
    if root.exists() and any(root.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"{root} exists: set overwrite=true or choose another run_name")
        shutil.rmtree(root)
    fmt = _CLI_FORMAT[cfg.resolved_data_format]
    rows = [r.raw for r in load_validated(cfg.data.train_file, fmt).rows]
    members, summaries = [], []
    for k in range(cfg.ensemble.members):
        train_file = root / "data" / f"member-{k}.jsonl"
        write_rows(train_file, _member_rows(cfg, rows, k))
        summary = train_reward(_member_config(cfg, root, k, str(train_file)))
        checkpoint, accuracy = _keep_best(root / f"member-{k}", summary)
        members.append(
            {
                "name": f"member-{k}",
                "checkpoint": str(checkpoint.relative_to(root)),
                "validation_accuracy": accuracy,
                "best_step": summary["best"]["step"],
                "stop_reason": summary["stop_reason"],
            }
        )
        summaries.append(summary)
    if not cfg.ensemble.keep_data:
        shutil.rmtree(root / "data")
    spec = {"kind": cfg.kind, "resample": cfg.ensemble.resample, "members": members}
    spec["stacking"] = None
    atomic_write_text(root / "ensemble.json", json.dumps(spec, indent=2) + "\n")
    # A cost model orders pairs by safety, not by chosen/rejected: its members' own
    # evaluations (in their summaries) are the meaningful ones.
    eval_accuracy = (
        _ensemble_accuracy(root, cfg.data.eval_file, fmt) if cfg.kind == "reward" else {}
    )
    if cfg.ensemble.stacking_file:
        spec["stacking"] = _fit_stacking(root, cfg.ensemble.stacking_file, fmt)
        atomic_write_text(root / "ensemble.json", json.dumps(spec, indent=2) + "\n")
    summary = {
        "run_dir": str(root),
        "members": members,
        "eval": eval_accuracy,
        "step": max(s["step"] for s in summaries),
        "metrics": {f"member-{k}": s.get("eval") for k, s in enumerate(summaries)},
    }
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _pairs(path: str, fmt: str) -> tuple[list, list, list]:
    from alignkit.data.validate import load_validated

    records = [r.record for r in load_validated(path, fmt).rows]
    return (
        [r["prompt"] for r in records],
        [r["chosen"] for r in records],
        [r["rejected"] for r in records],
    )


def _member_scores(root: Path, path: str, fmt: str) -> tuple[Any, Any, Any]:
    """Members' scores ``[K, N]`` of the chosen and rejected responses of ``path``."""
    from alignkit.models.ensemble import load_reward_source

    ensemble = load_reward_source(root)
    prompts, chosen, rejected = _pairs(path, fmt)
    return (
        ensemble.member_scores(prompts, chosen),
        ensemble.member_scores(prompts, rejected),
        ensemble,
    )


def _ensemble_accuracy(root: Path, path: str, fmt: str) -> dict[str, float]:
    """Held-out pair accuracy (ties half) of each member and of each combination."""
    import torch

    from alignkit.ops.evaluation import combine_rewards
    from alignkit.ops.stats import pairwise_accuracy

    chosen, rejected, ensemble = _member_scores(root, path, fmt)
    weights = torch.tensor(ensemble.validation_accuracy, dtype=torch.float32)
    out = {}
    for method in ("mean", "weighted", "median", "trimmed_mean"):
        out[f"eval/accuracy_{method}"] = float(
            pairwise_accuracy(
                combine_rewards(chosen, method, weights), combine_rewards(rejected, method, weights)
            )
        )
    for k, name in enumerate(ensemble.names):
        out[f"eval/accuracy_{name}"] = float(pairwise_accuracy(chosen[k], rejected[k]))
    return out


def _fit_stacking(root: Path, path: str, fmt: str) -> list[float]:
    from alignkit.models.ensemble import fit_stacking

    chosen, rejected, _ = _member_scores(root, path, fmt)
    return [float(w) for w in fit_stacking(chosen - rejected)]
