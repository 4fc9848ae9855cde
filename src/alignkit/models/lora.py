"""LoRA adapters through ``peft``, and the reference model as the base with the adapter disabled.

With LoRA the frozen base weights *are* the reference model of DPO/PPO: ``disabled_adapter``
runs the same module without its adapter, so no second copy of the model is held. A model
without an adapter has no such mode; the trainer checks ``has_adapter`` and keeps (or avoids
needing) a separate reference copy itself.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from alignkit.errors import ConfigError, ModelError
from alignkit.models.wrappers import unwrap_model


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    The adapter adds ``(alpha / r) * B @ A`` to each targeted weight; ``B`` starts at zero, so
    a fresh adapter leaves the model's outputs unchanged.
    """

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator: the update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (training mode only)
    # "all-linear" = every linear layer except the output layer, for any architecture; or a list
    # of module names such as ("q_proj", "v_proj").
    target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ConfigError("lora.target_modules is empty")
            if "all-linear" in self.target_modules:
                # peft knows the shorthand only as the whole value, not as a module name
                if len(self.target_modules) > 1:
                    raise ConfigError(
                        "lora.target_modules: 'all-linear' already covers every linear layer; "
                        f"give it alone or list module names, got {list(self.target_modules)}"
                    )
                object.__setattr__(self, "target_modules", "all-linear")

    @classmethod
    def coerce(cls, value: LoraSettings | Mapping[str, Any] | None) -> LoraSettings | None:
        """Accept settings, a dict (from YAML: ``lora: {r: 8, alpha: 16}``) or None."""
        if value is None or isinstance(value, LoraSettings):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"lora must be a mapping like {{r: 8, alpha: 16}}, got {value!r}")
        valid = [f.name for f in fields(cls)]
        for key in value:
            if key not in valid:
                near = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {valid}"
                raise ConfigError(f"unknown key 'lora.{key}'{hint}")
        return cls(**value)


def require_peft():
    try:
        import peft
    except ImportError:
        raise ModelError("LoRA needs the `peft` package: pip install 'alignkit[peft]'") from None
    return peft


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped for distributed training) carries a peft adapter."""
    if "peft" not in sys.modules:  # a peft model implies peft was imported; importing costs 0.2 s
        return False
    from peft import PeftModel

    return isinstance(unwrap_model(model), PeftModel)


def apply_lora(
    model: nn.Module, settings: LoraSettings, seed: int = 0, task_type: str = "CAUSAL_LM"
) -> nn.Module:
    """Wrap ``model`` in a ``PeftModel`` with a fresh adapter; only the adapter is trainable.

    The adapter's ``A`` matrices are initialised from ``seed`` without touching the global RNG.
    """
    peft = require_peft()
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=(
            settings.target_modules
            if isinstance(settings.target_modules, str)
            else list(settings.target_modules)
        ),
        bias="none",
        task_type=task_type,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as err:
            raise ModelError(f"cannot apply LoRA to this model: {err}") from None


@contextmanager
def disabled_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` with its LoRA adapter switched off: the base model, i.e. the reference.

    Raises ValueError for a model without an adapter (check ``has_adapter`` first): silently
    returning the policy itself as its own reference would make every KL zero.

    Example::

        with torch.no_grad(), disabled_adapter(policy) as reference:
            reference_logits = reference(input_ids, attention_mask=mask).logits
    """
    if not has_adapter(model):
        raise ValueError(
            "disabled_adapter needs a model with a LoRA adapter; this one has none "
            "(check has_adapter(model) and keep a separate reference model instead)"
        )
    with unwrap_model(model).disable_adapter():
        yield model
