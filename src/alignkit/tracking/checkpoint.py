"""Atomic checkpoints: `checkpoints/step-N/<model name>/` + `trainer_state.pt`.

A checkpoint is written into a temporary directory inside `checkpoints/` and renamed to
`step-N` only when complete (`trainer_state.pt` is written last), so a crash at any moment
leaves either the previous checkpoints or the new one, never a half one. Models are saved
with Hugging Face `save_pretrained` (safetensors) when they have it, else as a safetensors
state dict; `trainer_state.pt` holds what resuming needs: optimizer and scheduler states by
name, RNG states, controllers, data position, step (its layout is the trainer's:
`alignkit.runloop.run.RunLoop`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from alignkit.errors import CheckpointError
from alignkit.tracking.io import umask_mode
from alignkit.tracking.run_dir import RunDir, as_run_dir

TRAINER_STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step of a `step-N` directory name, else None."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: RunDir | str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and incomplete ones ignored)."""
    root = as_run_dir(run_dir).checkpoints_dir
    if not root.is_dir():
        return []
    found = [
        (step, path)
        for path in root.iterdir()
        if (step := checkpoint_step(path)) is not None and (path / TRAINER_STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: RunDir | str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def run_checkpoint(run_dir: RunDir | str | Path) -> tuple[Path, str] | None:
    """The checkpoint a finished or running run stands for, and which one it is: the best
    evaluation's (``summary.json``'s ``best``, from early stopping) while it is kept, else the
    newest complete one ("final" once the run's summary names it as its last); None for a
    directory without a complete checkpoint."""
    run_dir = as_run_dir(run_dir)
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    summary: dict[str, Any] = {}
    if run_dir.summary_path.is_file():
        try:
            summary = json.loads(run_dir.summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = {}
    best = (summary.get("best") or {}).get("step")
    if best is not None and (path := run_dir.checkpoint_dir(best)) in list_checkpoints(run_dir):
        return path, f"best checkpoint ({summary['best'].get('metric')} at step {best})"
    final = Path(str(summary.get("last_checkpoint", ""))).name == newest.name
    return newest, "final checkpoint" if final else "newest checkpoint"


def save_checkpoint(
    run_dir: RunDir | str | Path,
    step: int,
    models: Mapping[str, nn.Module],
    tokenizer: Any | None,
    trainer_state: Mapping[str, Any],
    *,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    keep_last: int | None = None,
    keep: Sequence[int] = (),
) -> Path:
    """Write `checkpoints/step-{step}` atomically and prune to the newest `keep_last`.

    Each model goes to `step-N/<name>/` (the tokenizer, if given, next to each). Pass
    `state_dicts` when the weights had to be gathered first (FSDP, DeepSpeed ZeRO-3).
    Call on the main process only.
    """
    run_dir = as_run_dir(run_dir)
    root = run_dir.checkpoints_dir
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = run_dir.checkpoint_dir(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step-{step}-", dir=root))
    tmp.chmod(umask_mode(0o777))  # mkdtemp's 0700 would ignore the user's umask
    try:
        for name, model in models.items():
            state_dict = state_dicts.get(name) if state_dicts else None
            save_model_weights(model, tmp / name, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / name)
        # Written last: its presence marks the checkpoint complete.
        torch.save(_weights_only_safe(dict(trainer_state)), tmp / TRAINER_STATE_FILE)
        old = None
        if final.exists():  # re-saving a step (e.g. after a resume): keep the swap atomic
            old = root / f"{_OLD_PREFIX}{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last, keep)
    return final


def prune_checkpoints(
    run_dir: RunDir | str | Path, keep_last: int, keep: Sequence[int] = ()
) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and those of the steps in
    `keep` (e.g. early stopping's best); returns what was deleted."""
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    doomed = [p for p in list_checkpoints(run_dir)[:-keep_last] if checkpoint_step(p) not in keep]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _remove_leftovers(root: Path) -> None:
    """Temporary directories of a crashed save (there is one writer, so none is live)."""
    for path in root.iterdir():
        if path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """Read `trainer_state.pt` of a checkpoint directory."""
    path = Path(checkpoint) / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint: no {TRAINER_STATE_FILE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


# --------------------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------------------


_SAVE_HOOKS: list[Callable[[nn.Module, Path], None]] = []


def register_save_hook(hook: Callable[[nn.Module, Path], None]) -> None:
    """Call ``hook(model, directory)`` after every `save_pretrained` of a checkpointed model.

    Lets the models layer add its own files (a LoRA adapter's base record) without tracking
    importing it.
    """
    if hook not in _SAVE_HOOKS:
        _SAVE_HOOKS.append(hook)


def save_model_weights(
    model: nn.Module, directory: Path, *, state_dict: Mapping[str, torch.Tensor] | None = None
) -> None:
    """`save_pretrained` (safetensors) when the model has it, else `model.safetensors`."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        kwargs = {"state_dict": dict(state_dict)} if state_dict is not None else {}
        with _quiet_transformers_progress():
            model.save_pretrained(directory, **kwargs)
        for hook in _SAVE_HOOKS:  # e.g. a LoRA adapter records where its base is
            hook(model, directory)
    elif state_dict is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, directory / "model.safetensors")
    else:
        save_model(model, str(directory / "model.safetensors"))  # handles tied tensors


@contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' per-save "Writing model shards" bar; it garbles our progress bar."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model_weights(model: nn.Module, directory: str | Path) -> None:
    """Load weights written by :func:`save_model_weights` into `model`, in place.

    Keys must match the model's; only tied parameters (saved once under another name) may
    be absent from the files.
    """
    directory = Path(directory)
    if hasattr(model, "peft_config") and (directory / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(
            model, load_file(directory / "adapter_model.safetensors")
        )
        if result.unexpected_keys:
            raise CheckpointError(
                f"{directory}: adapter weights do not fit the model: {_few(result.unexpected_keys)}"
            )
        return
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors weights to load")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    result = load_full_state_dict(model, weights)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: weights not in the model: {_few(result.unexpected_keys)}"
        )
    untied_missing = _untied(model, result.missing_keys, loaded=weights.keys())
    if untied_missing:
        raise CheckpointError(f"{directory}: weights missing: {_few(untied_missing)}")


def load_full_state_dict(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Any:
    """``model.load_state_dict(weights, strict=False)``, also when FSDP shards `model`: its
    parameters are then shards (DTensor) and each process copies its slice of the full
    tensors in. Returns the missing and unexpected keys."""
    if _is_sharded(model):
        options = StateDictOptions(full_state_dict=True, strict=False)
        return set_model_state_dict(model, dict(weights), options=options)
    return model.load_state_dict(weights, strict=False)


def _is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (version 1 or 2) shards `model`'s parameters over processes."""
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    )


def _untied(model: nn.Module, missing: list[str], loaded: Any) -> list[str]:
    """Missing keys that are not aliases (tied storage) of a loaded key."""
    state = model.state_dict(keep_vars=True)
    loaded_storage = {_storage(state[k]) for k in loaded if k in state}
    return [k for k in missing if _storage(state[k]) not in loaded_storage]


def _storage(tensor: torch.Tensor) -> int:
    """Where `tensor`'s data lives, to recognise ties. A DTensor's local shard may be empty
    (no storage) on some processes: tied DTensors are one object, so it is its identity."""
    return id(tensor) if isinstance(tensor, DTensor) else tensor.data_ptr()


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")


# --------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights_only_safe(value: Any) -> Any:
    """NumPy values as tensors/Python numbers, so `torch.load(weights_only=True)` reads them."""
    if isinstance(value, Mapping):
        return {k: _weights_only_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_weights_only_safe(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_weights_only_safe(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
