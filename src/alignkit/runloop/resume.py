"""What a resume may change: the settings a run was started with against those given now.

A resumed run continues the run in its directory, so its settings stay those the run was
started with, except:

- the run's length (``max_steps``, ``epochs``) and its bookkeeping (``logging.*``,
  ``checkpoint.*``), which resuming is for;
- settings the user allows by name (``allow_change=[optim.lr]``, CLI ``--allow-change``):
  applied from the resumed step on (the learning rate rescales the restored optimizer and
  schedule, so the new peak holds from that step) and recorded in ``config.yaml`` under
  ``_changes`` with that step.

Anything else that differs is refused with the list of differences. Settings the checkpoint
fixes (the model, the train file, AdamW's betas/eps/weight decay, which the restored optimizer
state carries) cannot change within a run even when allowed; nor can the seed and batch shape
(refused by the restore's data-order check).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import CHANGES_KEY, VERSIONS_KEY
from alignkit.errors import ConfigError

#: Differences a resume takes without being asked: they are what resuming is for, or (seed and
#: batch shape) the restore's data-order check refuses them with its own message.
FREE_KEYS = frozenset(
    {"resume_from", "overwrite", "allow_change", "run_name", "output_dir", "max_steps", "epochs"}
    | {"seed", "examples_per_device", "grad_accum_steps"}
)
FREE_PREFIXES = ("logging.", "checkpoint.")
#: Settings a checkpoint fixes: the model and data order, and the optimizer state's own values.
FIXED_PREFIXES = ("model.", "data.train_file", "reference")
FIXED_KEYS = frozenset({"optim.betas", "optim.eps", "optim.weight_decay"})


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _is_free(key: str) -> bool:
    return key in FREE_KEYS or key.startswith(FREE_PREFIXES)


def _is_fixed(key: str) -> bool:
    return key in FIXED_KEYS or key.startswith(FIXED_PREFIXES)


def resume_changes(
    config_path: Path, current: Mapping[str, Any], allowed: Iterable[str], step: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(earlier, new)``: the run's recorded changes, and this resume's (``{"step", "key",
    "from", "to"}``); ConfigError for a difference that is not allowed or cannot be made."""
    saved = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    earlier = list(saved.pop(CHANGES_KEY, None) or [])
    saved.pop(VERSIONS_KEY, None)
    before, now = flatten(saved), flatten(current)
    differing = [
        key
        for key in sorted(set(before) | set(now))
        if not _is_free(key) and before.get(key) != now.get(key)
    ]

    def show(keys: list[str]) -> str:
        return "; ".join(f"{key}: {before.get(key)} -> {now.get(key)}" for key in keys)

    fixed = [key for key in differing if _is_fixed(key)]
    if fixed:
        raise ConfigError(
            f"{config_path.parent} cannot continue with other {', '.join(fixed)} "
            f"({show(fixed)}): the checkpoint fixes them; start a new run instead"
        )
    refused = [key for key in differing if key not in set(allowed)]
    if refused:
        flags = " ".join(f"--allow-change {key}" for key in refused)
        raise ConfigError(
            f"resuming {config_path.parent} at step {step} would change settings it was run "
            f"with: {show(refused)}. Resume with the run's settings, or apply them from step "
            f"{step} by allowing each by name: allow_change=[{','.join(refused)}] (CLI: {flags})"
        )
    new = [{"step": step, "key": k, "from": before.get(k), "to": now.get(k)} for k in differing]
    return earlier, new


def describing_the_run(cfg: Any) -> Any:
    """`cfg` as the run's own config: without the command's resume/overwrite/allow settings,
    so that ``-c runs/X/config.yaml run_name=Y`` starts a new run instead of continuing X."""
    return dataclasses.replace(cfg, resume_from=None, overwrite=False, allow_change=[])


def rescale_learning_rate(optimizer_steps: Mapping[str, Any], old: float, new: float) -> None:
    """Move restored optimizers and their schedules to peak `new` instead of `old`: every
    group's lr and initial lr and every scheduler's base lrs by ``new / old``."""
    ratio = new / old
    for step in optimizer_steps.values():
        for group in step.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        scheduler = step.scheduler
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
        scheduler._last_lr = [group["lr"] for group in step.optimizer.param_groups]
