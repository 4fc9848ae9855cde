"""The peer libraries' own code, for tests that compare alignkit's formulas with it on identical
tensors (fixtures ``trl`` and ``verl`` in conftest.py). Test-only: neither library is a runtime
dependency.

- ``trl``: TRL 1.16 (the ``bench`` extra). Its GRPO loss is the real
  ``GRPOTrainer._compute_loss`` method run on a stub trainer (no model: the per-token log-probs
  are given), and the advantage code that TRL keeps inline in a long method is taken verbatim
  from that method's source (``trl_block``) and run on the given tensors.
- ``verl``: verl 0.9.1's ``verl/trainer/ppo/core_algos.py`` (with the real
  ``utils/torch_functional.py``, ``utils/groupwise.py`` and ``utils/import_utils.py`` it calls)
  loaded from the wheel, WITHOUT installing verl: importing verl's package pulls in ray,
  omegaconf and tensordict, so the names those modules provide to core_algos at import time
  (``DictConfig``, ``TensorDict``, ``AlgoConfig``, ``ActorConfig``, the device helpers) are
  stand-in classes and functions; all the arithmetic under test is verl's. Get the wheel with
  ``pip download verl==0.9.1 --no-deps -d .whl`` (or point ``ALIGNKIT_VERL_WHEEL`` at it);
  without it these tests are skipped with that instruction.
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
import types
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VERL_WHEEL = Path(os.environ.get("ALIGNKIT_VERL_WHEEL", ROOT / ".whl/verl-0.9.1-py3-none-any.whl"))


# --------------------------------------------------------------------------------------
# TRL


class _OneProcess:
    """The accelerator calls TRL's loss makes, for a single process."""

    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    importance_sampling_level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    entropies: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    sampling_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
) -> torch.Tensor:
    """TRL 1.16 ``GRPOTrainer._compute_loss`` on these tensors (one process, no gradient
    accumulation; the KL term with `beta` > 0 and `ref_logp`); `logp` is returned as the
    model's log-probs, so the loss's gradient reaches it."""
    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    n, width = logp.shape
    given_entropies = torch.zeros_like(logp) if entropies is None else entropies
    state = {
        "model": types.SimpleNamespace(training=True),
        "accelerator": _OneProcess(),
        "args": types.SimpleNamespace(
            delta=delta,
            sapo_temperature_pos=sapo_temperatures[0],
            sapo_temperature_neg=sapo_temperatures[1],
            steps_per_generation=1,
            use_bias_correction_kl=use_bias_correction_kl,
        ),
        "loss_type": loss_type,
        "importance_sampling_level": importance_sampling_level,
        "epsilon_low": epsilon,
        "epsilon_high": epsilon if epsilon_high is None else epsilon_high,
        "top_entropy_quantile": top_entropy_quantile,
        "off_policy_mask_threshold": off_policy_mask_threshold,
        "beta": beta,
        "use_vllm": False,
        "aux_loss_enabled": False,
        "_entropy_bonus_enabled": False,
        "current_gradient_accumulation_steps": 1,
        "max_completion_length": width,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_get_per_token_logps_and_entropies": lambda *args, **kwargs: (
            logp,
            given_entropies,
            None,
        ),
    }
    trainer.__dict__.update(state)
    inputs: dict[str, Any] = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "num_items_in_batch": mask.sum(),
    }
    if sampling_logp is not None:
        inputs["sampling_per_token_logps"] = sampling_logp
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    return trainer._compute_loss(None, inputs)


def trl_block(function: Any, first_line: str, last_line: str, **names: Any) -> dict[str, Any]:
    """Run the lines of `function`'s source from the one starting with `first_line` to the one
    starting with `last_line` (both included), dedented, in a namespace holding `names`; return
    the namespace. For TRL code that lives inline in a long method."""
    lines = inspect.getsource(function).splitlines()
    stripped = [line.strip() for line in lines]
    start = next(i for i, line in enumerate(stripped) if line.startswith(first_line))
    end = next(i for i, line in enumerate(stripped) if i >= start and line.startswith(last_line))
    code = textwrap.dedent("\n".join(lines[start : end + 1]))
    namespace = dict(names)
    exec(compile(code, f"<{function.__qualname__}>", "exec"), namespace)
    return namespace


# --------------------------------------------------------------------------------------
# verl


class _Config(dict):
    """Stands for verl's ActorConfig / DictConfig: attribute and ``get`` access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _stub(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _load_verl(wheel: Path) -> types.ModuleType:
    with zipfile.ZipFile(wheel) as archive:
        sources = {
            name: archive.read(f"verl/{name}.py").decode()
            for name in (
                "utils/import_utils",
                "utils/torch_functional",
                "utils/groupwise",
                "trainer/ppo/core_algos",
            )
        }
    packages = ("verl", "verl.utils", "verl.trainer", "verl.trainer.ppo", "verl.workers")
    stubs = {name: _stub(name, __path__=[]) for name in packages}
    stubs.update(
        {
            "omegaconf": _stub("omegaconf", DictConfig=_Config),
            "tensordict": _stub("tensordict", TensorDict=type("TensorDict", (), {})),
            "verl.utils.device": _stub(
                "verl.utils.device",
                get_device_name=lambda: "cpu",
                get_torch_device=lambda: torch.cpu,
            ),
            "verl.trainer.config": _stub(
                "verl.trainer.config", AlgoConfig=type("AlgoConfig", (), {})
            ),
            "verl.workers.config": _stub("verl.workers.config", ActorConfig=_Config),
        }
    )
    saved = {
        name: sys.modules.get(name)
        for name in [*stubs, *(f"verl.{n.replace('/', '.')}" for n in sources)]
    }
    sys.modules.update(stubs)
    try:
        loaded = {}
        for path, source in sources.items():
            name = "verl." + path.replace("/", ".")
            module = types.ModuleType(name)
            module.__file__ = f"{wheel}/verl/{path}.py"
            sys.modules[name] = module
            if path == "trainer/ppo/core_algos":
                utils = sys.modules["verl.utils"]
                utils.as_torch_index = loaded["utils/groupwise"].as_torch_index
                utils.group_mean_std = loaded["utils/groupwise"].group_mean_std
            exec(compile(source, module.__file__, "exec"), module.__dict__)
            loaded[path] = module
        return loaded["trainer/ppo/core_algos"]
    finally:  # leave sys.modules as it was: nothing else may import the stand-ins
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def load_verl() -> types.ModuleType:
    """verl 0.9.1's ``core_algos`` module (see the module docstring), or a skip."""
    if not VERL_WHEEL.is_file():
        pytest.skip(
            f"verl 0.9.1 wheel not found at {VERL_WHEEL}: run `pip download verl==0.9.1 "
            "--no-deps -d .whl` (or set ALIGNKIT_VERL_WHEEL) to compare against verl"
        )
    return _load_verl(VERL_WHEEL)


def verl_actor_config(**settings: Any) -> _Config:
    """An actor config for verl's policy losses (one process, local aggregation)."""
    base = {
        "clip_ratio": 0.2,
        "clip_ratio_low": None,
        "clip_ratio_high": None,
        "clip_ratio_c": 3.0,
        "tau_pos": 1.0,
        "tau_neg": 1.05,
        "global_batch_info": {},
    }
    return _Config({**base, **settings})
