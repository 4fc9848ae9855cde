"""Verified weight sync: after every sync the engine scores a fixed probe and must agree with the
trainer on the same tokens.

The probe is a few fixed token sequences (prompts and continuations). After sync ``k`` the
engine's log-probs of their tokens (``e_k``, temperature 1) are compared with the trainer's on the
same tokens (``t_k``):

- the gap ``max |e_k - t_k|`` is logged as ``rollout/sync_probe_max_abs`` and must stay within
  ``max_gap``, a bound that depends on the dtypes (below);
- **stale weights**: when the trainer's log-probs moved by more than ``min_visible_change`` since
  the previous sync (``max |t_k - t_{k-1}| > min_visible_change``) the engine's must have moved
  too (``max |e_k - e_{k-1}| > 0``); a server that did not load the update scores the probe
  exactly as before (the same weights, the same batch) and is caught even when the trainer's
  change is within ``max_gap``.

Either failure raises :class:`SyncProbeError`, naming the sync and the numbers; the trainer stops.

Default bounds (:func:`default_probe_bounds`), from the measurements in
``docs/vllm.md``: vLLM fp32 against an fp32 trainer agrees to < 1e-4 on SmolLM2-135M (507 sampled
tokens) and to < 1e-6 on the ``tiny-hd64`` preset, so the bound is 1e-3; with bf16 (or fp16) on
either side the gap reached 0.39 (bf16 vLLM, fp32 trainer) and 0.48 (both bf16), so the bound is
1.0 nats, and a bf16 engine may legitimately not change after an update smaller than its rounding
(the stale test then needs a trainer move above 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignkit.rollout.vllm.client import VLLMError

__all__ = [
    "ProbeComparison",
    "SyncProbe",
    "SyncProbeError",
    "compare_probe",
    "default_probe_bounds",
]

_EXACT = ("float32", "fp32")


class SyncProbeError(VLLMError):
    """The engine does not serve the weights just trained (stale, corrupted, or too far off)."""


def default_probe_bounds(engine_dtype: str, trainer_dtype: str) -> tuple[float, float]:
    """``(max_gap, min_visible_change)`` for an engine and a trainer running in these dtypes
    (``"float32"``, ``"bfloat16"``, ``"float16"``; see the module docstring for the numbers)."""
    if str(engine_dtype).removeprefix("torch.") in _EXACT and (
        str(trainer_dtype).removeprefix("torch.") in _EXACT
    ):
        return 1e-3, 1e-3
    return 1.0, 0.1


@dataclass(frozen=True)
class ProbeComparison:
    """The outcome of one probe check (all values in nats, over the probe's tokens)."""

    sync: int
    max_abs: float  # max |engine - trainer| now
    mean_abs: float
    engine_change: float | None  # max |engine now - engine at the previous sync|
    trainer_change: float | None  # max |trainer now - trainer at the previous sync|
    max_gap: float
    min_visible_change: float

    @property
    def stale(self) -> bool:
        """The trainer moved visibly since the previous sync but the engine did not move at all."""
        if self.engine_change is None or self.trainer_change is None:
            return False
        return self.trainer_change > self.min_visible_change and self.engine_change == 0.0

    @property
    def too_far(self) -> bool:
        return not self.max_abs <= self.max_gap  # NaN counts as too far

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/sync_probe_max_abs": self.max_abs,
            "rollout/sync_probe_mean_abs": self.mean_abs,
        }

    def error(self, where: str = "") -> SyncProbeError | None:
        """The error that stops the run, or None when the sync is verified."""
        at = f"weight sync {self.sync}{f' ({where})' if where else ''}"
        if self.stale:
            return SyncProbeError(
                f"{at}: the engine serves STALE weights: the trainer's probe log-probs moved by "
                f"up to {self.trainer_change:.4g} since the previous sync but the engine's did not "
                f"move at all (engine-trainer gap now {self.max_abs:.4g}, bound {self.max_gap:.4g})"
            )
        if self.too_far:
            return SyncProbeError(
                f"{at}: the engine's probe log-probs differ from the trainer's by up to "
                f"{self.max_abs:.4g} nats (mean {self.mean_abs:.4g}), above the bound "
                f"{self.max_gap:.4g}: the weights it serves are not the ones just trained"
            )
        return None


def compare_probe(
    sync: int,
    engine: Tensor,
    trainer: Tensor,
    *,
    max_gap: float,
    min_visible_change: float,
    previous_engine: Tensor | None = None,
    previous_trainer: Tensor | None = None,
) -> ProbeComparison:
    """Compare flat log-prob vectors of the probe's tokens (pure; see the module docstring)."""
    if engine.shape != trainer.shape or engine.numel() == 0:
        raise ValueError(f"probe log-probs must match in shape: {engine.shape} vs {trainer.shape}")
    engine, trainer = engine.double(), trainer.double()
    gap = (engine - trainer).abs()
    engine_change = trainer_change = None
    if previous_engine is not None and previous_trainer is not None:
        engine_change = float((engine - previous_engine.double()).abs().max())
        trainer_change = float((trainer - previous_trainer.double()).abs().max())
    return ProbeComparison(
        sync=sync,
        max_abs=float(gap.max()),
        mean_abs=float(gap.mean()),
        engine_change=engine_change,
        trainer_change=trainer_change,
        max_gap=max_gap,
        min_visible_change=min_visible_change,
    )


class SyncProbe:
    """Fixed probe sequences and the state of the last verified sync.

    Args:
        sequences: token-id sequences; every token after the first is scored.
        max_gap, min_visible_change: see :func:`default_probe_bounds`.
    """

    def __init__(
        self, sequences: Sequence[Sequence[int]], *, max_gap: float, min_visible_change: float
    ) -> None:
        if not sequences or any(len(s) < 2 for s in sequences):
            raise ValueError("the sync probe needs sequences of at least 2 tokens")
        if not (max_gap > 0 and min_visible_change >= 0):
            raise ValueError("the probe's max_gap must be > 0 and min_visible_change >= 0")
        self.sequences = [list(s) for s in sequences]
        self.max_gap = max_gap
        self.min_visible_change = min_visible_change
        self._previous: dict[str, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_prompts(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        *,
        count: int = 4,
        continuation: int = 16,
        max_length: int | None = None,
        **bounds: float,
    ) -> SyncProbe:
        """``count`` probe sequences: prompt ``i`` followed by the first ``continuation`` tokens
        of prompt ``i + 1`` (real text, fixed for the whole run)."""
        prompts = [list(p) for p in prompt_ids if p][: count + 1]
        if not prompts:
            raise ValueError("the sync probe needs at least one non-empty prompt")
        sequences = []
        for i in range(min(count, len(prompts))):
            sequence = prompts[i] + prompts[(i + 1) % len(prompts)][:continuation]
            sequences.append(sequence[:max_length] if max_length else sequence)
        return cls(sequences, **bounds)

    def trainer_logprobs(self, model: nn.Module) -> Tensor:
        """The trainer's log-probs of the probe tokens (temperature 1), flat, float32, computed
        in the weights' dtype with autocast off: the probe checks the weights the server holds
        (its bound follows the weights' and the server's dtypes), whatever precision the run's
        forwards use (``precision: bf16`` would add its own ~1e-2 rounding to the gap)."""
        from alignkit.models.forward import token_logprobs

        device = next(model.parameters()).device
        width = max(len(s) for s in self.sequences)
        ids = torch.zeros(len(self.sequences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(self.sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        scored = mask.clone()
        scored[:, 0] = 0
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                logprobs = token_logprobs(model, batch, scored.to(device))
        finally:
            model.train(was_training)
        return logprobs.float().cpu()[scored.bool()]

    def engine_logprobs(self, scores: Sequence[Sequence[float]]) -> Tensor:
        """Flatten an engine's per-sequence scores in the order of :meth:`trainer_logprobs`."""
        return torch.tensor([x for row in scores for x in row], dtype=torch.float32)

    def check(
        self, sync: int, engine: Tensor, trainer: Tensor, *, server: str = "", where: str = ""
    ) -> ProbeComparison:
        """Compare with the previous sync of the same ``server``, remember this sync's log-probs
        for the next stale test, and raise :class:`SyncProbeError` when the sync is not verified
        (the message names ``where``, by default the server)."""
        previous = self._previous.get(server)
        result = compare_probe(
            sync,
            engine,
            trainer,
            max_gap=self.max_gap,
            min_visible_change=self.min_visible_change,
            previous_engine=previous[0] if previous else None,
            previous_trainer=previous[1] if previous else None,
        )
        error = result.error(where or server)
        if error is not None:
            raise error
        self._previous[server] = (engine.clone(), trainer.clone())
        return result
