"""Which precision a run computes in: the one rule behind ``precision: auto | fp32 | bf16``.

- ``fp32``: no autocast; everything in the weights' dtype (float32 unless ``model.dtype`` says
  otherwise).
- ``bf16``: bfloat16 autocast around every forward of the run's models, with the weights kept in
  their dtype (float32 master weights by default): gradients, the optimizer state and the
  update stay float32, only the matmuls and attention run in bfloat16.
- ``auto`` (the default): ``bf16`` where it is fast, ``fp32`` elsewhere. bf16 is chosen when
  (1) the device runs bfloat16 matmuls natively: a CPU with AMX-BF16 or AVX-512 BF16 (x86) or
  the BF16 extension (Arm) that oneDNN may use, or a CUDA GPU of compute capability >= 8.0;
  (2) the weights are float32 (bf16 weights compute in bf16 anyway; autocast adds nothing); and
  (3) the model's matmuls are at least :data:`AUTO_BF16_MIN_HIDDEN` wide. The third condition
  is measured, not a guess: on this project's AMX CPU (one thread) a forward + backward of 16 x
  128 tokens takes 0.13-0.15 s in fp32 and 0.21-0.24 s in bf16 on the ``tiny`` preset (hidden
  64: the casts autocast adds cost more than the small matmuls save), 0.45 s vs 0.32-0.38 s on
  ``tiny-hd64`` (hidden 128), and on SmolLM2-135M (hidden 576, 4 x 128 tokens) 7.3-10.6 s vs
  4.9-6.0 s.

Where bf16 runs, the rule for *where* it applies is one: every forward pass of a run's models
runs inside the run's ``accelerator.autocast()`` (the optimizer step, evaluation, the passes
before training such as DPO's reference log-probs, and an online iteration's rollout, rewards,
reference, values). accelerate's own per-model forward wrapper is removed when a model is
prepared (:func:`drop_autocast_wrapper`): it would cast every output, the ``[N, V]`` logits
included, to float32, and a generation engine that unwraps the model for sampling would
silently take it off the trainer's model too.

What stays float32 under bf16 (where the accumulations matter): the log-softmax over the
vocabulary, the gathered log-probs and entropies and their sums over tokens
(``ops.logprobs``: logits are upcast one block of rows at a time), every loss and estimator
(``ops``: at least float32), the LM-head logits' sampling distribution in the decode loop
(``ops.sampling``), RMSNorm's statistics, the residual stream of fp32 weights (bf16 matmul
outputs are added to it in float32), the rotary embedding's angles, the gradients, the gradient
norm and AdamW. The logits themselves are bfloat16 (the LM head is a bf16 matmul): a token's
log-prob carries the rounding of its logit (~0.03 nats for logits of size ~10), the same in the
trainer's forward and the engine's decode, which is why they agree to ~1e-2, not ~1e-6.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "AUTO_BF16_MIN_HIDDEN",
    "ChosenPrecision",
    "drop_autocast_wrapper",
    "matmul_width",
    "native_bf16",
    "resolve_precision",
]

#: The narrowest matmul (hidden size) for which ``auto`` picks bf16 (module docstring).
AUTO_BF16_MIN_HIDDEN = 128

#: oneDNN ISA limits (``ONEDNN_MAX_CPU_ISA``) that still reach the bf16 instructions.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10", "DEFAULT", "ALL")


@dataclass(frozen=True)
class ChosenPrecision:
    """What a run computes in: ``name`` (``fp32`` or ``bf16``), what was ``requested``
    (``auto``, ``fp32`` or ``bf16``) and ``reason``, a sentence a user can check."""

    name: Literal["fp32", "bf16"]
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the matmuls (what the peak FLOP rate is measured in)."""
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        """``bf16 (auto: ...)``, the start-up line's wording."""
        return f"{self.name} ({self.requested}: {self.reason})"


def resolve_precision(requested: str, model: nn.Module, device: torch.device) -> ChosenPrecision:
    """The precision a run with setting ``requested`` computes ``model`` in on ``device``."""
    if requested in ("fp32", "bf16"):
        return ChosenPrecision(requested, requested, "set explicitly")  # type: ignore[arg-type]
    if requested != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
    hardware = native_bf16(device)
    if not hardware.startswith("yes"):
        return ChosenPrecision("fp32", "auto", hardware)
    dtype = _weights_dtype(model)
    if dtype != torch.float32:
        return ChosenPrecision("fp32", "auto", f"the weights are {dtype}: they set the precision")
    width = matmul_width(model)
    if width is not None and width < AUTO_BF16_MIN_HIDDEN:
        return ChosenPrecision(
            "fp32",
            "auto",
            f"hidden size {width} < {AUTO_BF16_MIN_HIDDEN}: bf16 casts cost more than such "
            f"small matmuls save ({hardware[5:]})",
        )
    return ChosenPrecision("bf16", "auto", hardware[5:])


def native_bf16(device: torch.device) -> str:
    """``"yes: <what runs bf16 matmuls>"`` when ``device`` runs bfloat16 matmuls natively,
    else the reason it does not (a sentence)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if major >= 8:
            return f"yes: {name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return f"{name} (compute capability {major}.{minor} < 8.0) has no bf16 tensor cores"
    if device.type != "cpu":
        return f"device {device.type}: bf16 speed is not known here, fp32 is the safe choice"
    return _native_bf16_cpu()


@functools.cache
def _native_bf16_cpu() -> str:
    flags = _cpu_flags()
    units = [name for flag, name in _CPU_BF16_FLAGS if flag in flags]
    units += [name for check, name in _TORCH_BF16_CHECKS if _torch_cpu_check(check)]
    units = list(dict.fromkeys(units))
    if not units:
        return "this CPU has no bf16 matmul units (no AMX-BF16, AVX-512 BF16 or Arm BF16)"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "oneDNN (mkldnn), which runs bf16 matmuls on CPU, is off in this torch"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not any(isa.startswith(ok) for ok in _BF16_ISAS):
        return f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN off the bf16 units"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"yes: CPU with {' and '.join(units)} (torch CPU capability {capability})"


_CPU_BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX-512 BF16"), ("bf16", "BF16"))
_TORCH_BF16_CHECKS = (
    ("_is_amx_tile_supported", "AMX-BF16"),
    ("_is_avx512_bf16_supported", "AVX-512 BF16"),
)


def _torch_cpu_check(name: str) -> bool:
    """torch's own CPUID checks (private, so looked up defensively)."""
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if callable(check) else False
    except RuntimeError:
        return False


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm) from /proc/cpuinfo."""
    if platform.system() != "Linux":
        return set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _weights_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def matmul_width(model: nn.Module) -> int | None:
    """The model's hidden size: its config's ``hidden_size`` (a reward or value model's
    backbone's), else the widest input of its ``nn.Linear`` layers; None without either."""
    for owner in (model, getattr(model, "backbone", None), getattr(model, "module", None)):
        config = getattr(owner, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if isinstance(hidden, int):
            return hidden
    widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    return max(widths) if widths else None


def drop_autocast_wrapper(model: nn.Module) -> None:
    """Undo accelerate's mixed-precision ``forward`` wrapper on ``model`` (in place).

    ``Accelerator.prepare_model`` wraps the forward of a model it prepares in autocast and in a
    cast of every output to float32. alignkit opens the autocast itself around every forward
    (module docstring), so the wrapper would only add the float32 copy of the logits.
    """
    original: Any = model.__dict__.pop("_original_forward", None)
    if original is None:
        return
    if getattr(original, "__func__", None) is getattr(type(model), "forward", None):
        model.__dict__.pop("forward", None)  # the class's forward again
    else:
        model.forward = original
