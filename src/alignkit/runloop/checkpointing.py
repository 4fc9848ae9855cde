"""What a checkpoint holds and how a run finds, writes and restores it: the models of
:meth:`Checkpointing.checkpoint_models`, the registered controllers, and ``trainer_state.pt``
(optimizer and scheduler states by name, skip counters, controllers, loop state, the schedule's
extra state, every process' RNG state); the run directory's preparation for a fresh run or a
resume (later checkpoints moved aside, the settings a resume changes).

:class:`Checkpointing` is the part of :class:`~alignkit.runloop.run.RunLoop` that does this; it
reads the run's attributes (``config``, ``accelerator``, ``run_dir``, ``state``,
``optimizer_steps``, ...) that ``RunLoop.__init__`` sets.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from accelerate.utils import DistributedType, gather_object
from torch import nn

from alignkit.config import config_to_dict, save_resolved_config
from alignkit.errors import CheckpointError, ConfigError
from alignkit.runloop.resume import describing_the_run, rescale_learning_rate, resume_changes
from alignkit.tracking import (
    capture_rng_state,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
)
from alignkit.tracking.checkpoint import TRAINER_STATE_FILE

if TYPE_CHECKING:
    from alignkit.runloop.optimizer import OptimizerStep

#: trainer_state.pt layout. 1: one "optimizer"/"scheduler" state. 2: both are maps by name,
#: plus "optimizer_steps" (skip counters) and "extra". Format 1 checkpoints still load.
_STATE_FORMAT = 2


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state is checkpointed: controllers, running statistics."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointing:
    """Checkpoints and resume of a :class:`~alignkit.runloop.run.RunLoop` (see the module doc)."""

    # What is checkpointed, set by RunLoop.__init__ and filled by the register methods.
    optimizer_steps: dict[str, OptimizerStep]
    _controllers: dict[str, Stateful]
    _extra_models: dict[str, nn.Module]

    def checkpoint_models(self) -> dict[str, nn.Module]:
        """Models saved in each checkpoint as `step-N/<name>/`: the primary model first,
        then those given to :meth:`register_model` (all unwrapped)."""
        return {self.primary_model_name: self.unwrapped_model, **self._extra_models}

    def restore_model_weights(self, model: nn.Module, directory: Path) -> None:
        """Load a checkpointed model's weights in place (override for custom formats)."""
        load_model_weights(model, directory)

    # ----------------------------------------------------------------- registration

    def register_controller(self, name: str, controller: Stateful) -> None:
        """Checkpoint `controller`'s state_dict under `name` and restore it on resume."""
        if not isinstance(controller, Stateful):
            raise TypeError(f"controller {name!r} needs state_dict() and load_state_dict()")
        if name in self._controllers:
            raise ValueError(f"a controller named {name!r} is already registered")
        self._controllers[name] = controller

    def register_model(self, name: str, model: nn.Module) -> None:
        """Save `model` (e.g. a critic) in every checkpoint as `step-N/<name>/` and restore
        its weights on resume. Pass the unwrapped model."""
        if name == self.primary_model_name or name in self._extra_models:
            raise ValueError(f"a model named {name!r} is already registered")
        self._extra_models[name] = model

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Save models and the full trainer state to `checkpoints/step-N` (all processes)."""
        acc = self.accelerator
        rng = capture_rng_state()
        rng_per_process = gather_object([rng]) if acc.num_processes > 1 else [rng]
        models = self.checkpoint_models()
        state_dicts = None
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            state_dicts = {name: acc.get_state_dict(model) for name, model in models.items()}
        # On every process: under FSDP gathering the optimizer state is a collective.
        steps = {name: step.state_dict() for name, step in self.optimizer_steps.items()}
        path = self.run_dir.checkpoint_dir(self.state.step)
        if acc.is_main_process:
            path = save_checkpoint(
                self.run_dir,
                self.state.step,
                models,
                self.tokenizer,
                self._trainer_state(steps, rng_per_process),
                state_dicts=state_dicts,
                keep_last=self.config.checkpoint.keep_last,
                keep=() if self.state.best_step is None else (self.state.best_step,),
            )
        acc.wait_for_everyone()
        return path

    def _trainer_state(
        self, steps: dict[str, dict[str, Any]], rng_per_process: list[dict[str, Any]]
    ) -> dict[str, Any]:
        state = self.state
        return {
            "format": _STATE_FORMAT,
            "step": state.step,
            "epoch": state.epoch,
            "total_steps": self.total_steps,
            "data": self._data_order_settings(),
            "optimizer": {name: s.pop("optimizer") for name, s in steps.items()},
            "scheduler": {name: s.pop("scheduler") for name, s in steps.items()},
            "optimizer_steps": steps,  # what is left: the skip counters
            "controllers": {name: c.state_dict() for name, c in self._controllers.items()},
            "loop": state.state_dict(),
            "extra": self._extra_state(),
            "rng": rng_per_process,
        }

    def _find_resume_checkpoint(self) -> Path | None:
        resume_from = self.config.resume_from
        if not resume_from:
            return None
        path = Path(resume_from)
        if checkpoint_step(path) is not None and (path / TRAINER_STATE_FILE).is_file():
            return path  # a checkpoint directory was named
        if not path.is_dir():
            raise CheckpointError(f"resume_from={path}: no such run directory")
        found = latest_checkpoint(path)
        if found is None:
            self._say(f"{path} has no complete checkpoint yet: starting from step 0")
        return found

    def _prepare_run_dir(self, resume_step: int | None) -> list[dict[str, Any]]:
        """Check, clear or extend the run directory and write config.yaml; the settings this
        resume changes (see ``runloop.resume``)."""
        if not self.accelerator.is_main_process:
            return []
        run_dir, cfg = self.run_dir, self.config
        if cfg.resume_from is None and run_dir.has_results():
            if not cfg.overwrite:
                raise ConfigError(
                    f"run directory {run_dir.root} already holds a run: continue it with "
                    f"resume_from={run_dir.root}, set overwrite=true, or choose another run_name"
                )
            run_dir.clear_results()
        if cfg.resume_from is not None:
            # Resuming from an older checkpoint abandons the later ones, as it does the later
            # metrics: left in place, the newest would be taken for this run's on a resume.
            # They are moved aside, not deleted: the user may still want them.
            aside = (
                run_dir.abandoned_dir / f"before-resume-at-step-{resume_step or 0}-{time.time_ns()}"
            )
            for path in list_checkpoints(run_dir):
                if checkpoint_step(path) > (resume_step or 0):
                    aside.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(path), str(aside / path.name))
                    self._say(
                        f"moved {path} to {aside}: it comes after the checkpoint resumed from"
                    )
        earlier: list[dict[str, Any]] = []
        changes: list[dict[str, Any]] = []
        if (
            cfg.resume_from is not None
            and resume_step is not None
            and run_dir.config_path.is_file()
        ):
            earlier, changes = resume_changes(
                run_dir.config_path, config_to_dict(cfg), cfg.allow_change, resume_step
            )
        run_dir.create()
        save_resolved_config(describing_the_run(cfg), run_dir.config_path, earlier + changes)
        return changes

    def _apply_changes(self, changes: list[dict[str, Any]]) -> None:
        """Make allowed resume changes hold fully from the resumed step (the restored optimizer
        would otherwise keep the old learning rate), and say so."""
        for change in changes:
            if change["key"] == "optim.lr":
                rescale_learning_rate(self.optimizer_steps, change["from"], change["to"])
            self._say(
                f"changed on resume from step {change['step']}: {change['key']} "
                f"{change['from']} -> {change['to']}"
            )

    def _restore(self, checkpoint: Path) -> None:
        saved = _upgrade_state(load_trainer_state(checkpoint), checkpoint, self.optimizer_steps)
        acc = self.accelerator
        changed = [
            f"{key} {saved['data'].get(key)} -> {value}"
            for key, value in self._data_order_settings().items()
            if saved["data"].get(key) != value
        ]
        if changed:
            raise CheckpointError(
                f"{checkpoint} cannot continue with this setup, the data order would differ "
                f"({'; '.join(changed)}); resume with the original settings"
            )
        _require_same_names(checkpoint, "optimizers", self.optimizer_steps, saved["optimizer"])
        _require_same_names(checkpoint, "controllers", self._controllers, saved["controllers"])
        for name, model in self.checkpoint_models().items():
            self.restore_model_weights(model, checkpoint / name)
        for name, step in self.optimizer_steps.items():
            counters = saved["optimizer_steps"].get(name, {})
            step.load_state_dict(
                {"optimizer": saved["optimizer"][name], "scheduler": saved["scheduler"][name]}
                | counters
            )
        for name, controller in self._controllers.items():
            controller.load_state_dict(saved["controllers"][name])
        self.state.load_state_dict(saved["loop"], acc.device)
        self._load_extra_state(saved["extra"])
        restore_rng_state(saved["rng"][acc.process_index])


def _upgrade_state(
    saved: dict[str, Any], checkpoint: Path, optimizers: Mapping[str, Any]
) -> dict[str, Any]:
    """A format-1 state (one optimizer) in the format-2 layout; newer formats are refused."""
    version = saved.get("format")
    if version == _STATE_FORMAT:
        return saved
    if version == 1 and len(optimizers) == 1:
        (name,) = optimizers
        return saved | {
            "optimizer": {name: saved["optimizer"]},
            "scheduler": {name: saved["scheduler"]},
            "optimizer_steps": {},
            "extra": {},
        }
    raise CheckpointError(
        f"{checkpoint}: trainer state format {version} cannot be read by this alignkit "
        f"(it reads format {_STATE_FORMAT}, and format 1 for single-optimizer trainers)"
    )


def _require_same_names(
    checkpoint: Path, what: str, current: Mapping[str, Any], saved: Mapping[str, Any]
) -> None:
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    if missing or extra:
        raise CheckpointError(
            f"{checkpoint}: {what} differ (not in checkpoint: {missing}; "
            f"not registered now: {extra})"
        )
