"""Lagrangian safety: the combination of objective and constraint, the cost estimate J_C and
the multiplier's update (seed 000).

Safe-DPO trains ``(loss_H + λ·loss_S)`` and adapts λ from an estimate of the policy's harm
cost J_C: λ grows while the policy prefers the less safe response of a pair (J_C > 0) and
shrinks while it prefers the safer one (J_C < 0).

Two rules are kept so they can be compared, as the seed's own before/after table does:

- ``rule="log"`` (the seed's rule, the default): J_C is smoothed by an EMA seeded with the
  first batch value, then ``ln λ += lr · λ · J_C_ema`` and ``λ = clamp(exp(ln λ), min, max)``.
  λ stays positive, and when J_C < 0 it decays like ``1 / (lr·|J_C|·t)`` instead of hitting
  zero within an epoch.
- ``rule="linear"`` (the seed's "before"): ``λ += lr · J_C_batch``, clamped to [min, max];
  paired with :func:`estimate_cost_from_data` (``J_C = -mean(ΔS)``) it drives λ to the floor
  fast because ΔS > 0 on almost every pair whatever the policy does.

The multiplier's state is plain Python floats (double precision) so that an update is
bit-for-bit reproducible across devices and after a checkpoint round trip.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from alignkit.errors import CheckpointError
from alignkit.ops._dtype import at_least_float32

__all__ = [
    "LagrangeMultiplier",
    "LagrangeRule",
    "estimate_cost",
    "estimate_cost_from_data",
    "lagrangian_combine",
]

LagrangeRule = Literal["log", "linear"]
_RULES = ("log", "linear")
# math.exp overflows above ~709.78; anything that large is clamped to max_value anyway.
_EXP_OVERFLOW = 709.0


def lagrangian_combine(
    primary: Tensor, constraint: Tensor, lam: float | Tensor, normalize: bool = True
) -> Tensor:
    """``(primary + lam * constraint) / (1 + lam)``, or ``primary + lam * constraint``.

    The Lagrangian of "optimise ``primary`` subject to ``constraint``" with multiplier
    ``lam >= 0``; dividing by ``1 + lam`` (``normalize=True``, Safe RLHF, Dai et al. 2023,
    arXiv:2310.12773, §3.3) keeps its scale, and so the learning rate's meaning, independent of
    ``lam``: a convex combination with weights ``1/(1+lam)`` and ``lam/(1+lam)``.

    Sign convention: both arguments point the same way, the way ``primary`` is optimised.

    - Losses (minimised), Safe-DPO: ``lagrangian_combine(loss_H, loss_S, lam)``; a larger
      ``lam`` weighs the safety loss more.
    - Advantages (maximised), Safe-PPO: a cost is to be *lowered*, so pass its negation,
      ``lagrangian_combine(A_reward, -A_cost, lam)`` = ``(A_r - lam A_c) / (1 + lam)``.

    Args:
        primary, constraint: tensors of one shape (per-example losses, per-token advantages,
            or 0-d means).
        lam: the multiplier, a float or a tensor broadcastable to them, >= 0 (not checked for
            tensors, to avoid a device sync).
        normalize: divide by ``1 + lam``.
    """
    if primary.shape != constraint.shape:
        raise ValueError(
            f"primary {tuple(primary.shape)} and constraint {tuple(constraint.shape)} differ"
        )
    if not isinstance(lam, Tensor) and not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    combined = primary + lam * constraint
    return combined / (1.0 + lam) if normalize else combined


def _pair_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def estimate_cost(
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    delta_safety: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Estimate the policy's harm cost J_C from preference pairs (seed 000, exactly).

    ``J_C = mean(-sign(logp_w - logp_l) · sign(ΔS) · |ΔS|)``

    - ``logp_chosen`` / ``logp_rejected`` ``[P]``: the *policy's* summed log-probs of the
      chosen (w) and rejected (l) responses, so ``logp_w - logp_l > 0`` means the policy
      prefers the chosen one. For NOTES' ``preference: implicit_reward`` pass the implicit
      rewards ``logp_w - ref_w`` and ``logp_l - ref_l`` instead.
    - ``delta_safety`` ``[P]``: ``ΔS = safety(w) - safety(l)``, > 0 when the chosen response
      is the safer one.
    - ``mask`` ``[P]`` (optional): 1 for pairs that count; the mean is over those.

    Sign convention: a pair where the policy prefers the safer response contributes
    ``-|ΔS|``, one where it prefers the less safe response ``+|ΔS|``; so J_C > 0 means the
    policy tends to prefer the less safe response. Pairs with a tie in either log-prob or
    safety contribute 0. ``sign(ΔS)·|ΔS| = ΔS``, so this is ``-mean(sign(logp_w - logp_l)·ΔS)``.

    Returns a 0-d tensor (float32, or float64 for float64 inputs); no gradient flows through
    ``sign``.
    """
    log_ratio = at_least_float32(logp_chosen - logp_rejected)
    delta = at_least_float32(delta_safety)
    per_pair = -torch.sign(log_ratio) * torch.sign(delta) * delta.abs()
    return _pair_mean(per_pair, mask)


def estimate_cost_from_data(delta_safety: Tensor, mask: Tensor | None = None) -> Tensor:
    """The old cost estimate (seed 000's "before"): ``J_C = -mean(ΔS)``.

    It ignores the policy entirely: with ΔS > 0 on most pairs it is almost always negative,
    which is why, with the linear rule, λ collapsed to zero. Kept only for comparison.
    """
    return -_pair_mean(at_least_float32(delta_safety), mask)


class LagrangeMultiplier:
    """The Safe-DPO multiplier λ with the seed's log-space update (or the old linear one).

    ``update(j_c_batch)`` with ``rule="log"``::

        J_C_ema = j_c_batch                                   (first call)
        J_C_ema = ema · J_C_ema + (1 - ema) · j_c_batch       (later calls)
        ln λ   += lr · λ · J_C_ema
        λ       = clamp(exp(ln λ), min_value, max_value);  ln λ = log(λ)

    With ``rule="linear"``: ``λ = clamp(λ + lr · j_c_batch, min_value, max_value)``; the EMA
    is still tracked so that ``j_c_ema`` can be logged, but it does not enter the update.

    Arguments are checked (``ValueError``): ``0 <= ema < 1``, ``lr >= 0``,
    ``0 < min_value <= init <= max_value < inf`` (``min_value = 0`` is allowed for the linear
    rule, whose λ may reach zero).
    """

    def __init__(
        self,
        init: float = 1.0,
        lr: float = 0.01,
        ema: float = 0.95,
        min_value: float = 1e-6,
        max_value: float = 10.0,
        rule: LagrangeRule = "log",
    ) -> None:
        if rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not (0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        lowest = 0.0 if rule == "linear" else math.nextafter(0.0, 1.0)
        if not (min_value >= lowest and math.isfinite(max_value) and min_value <= max_value):
            floor = ">= 0" if rule == "linear" else "> 0"
            raise ValueError(
                f"need min_value {floor} and min_value <= max_value < inf, "
                f"got min_value={min_value}, max_value={max_value}"
            )
        if not (min_value <= init <= max_value):
            raise ValueError(f"init={init} must lie in [min_value={min_value}, {max_value}]")
        self.lr = float(lr)
        self.ema = float(ema)
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self.rule: LagrangeRule = rule
        self._value = float(init)
        self._log_value = _safe_log(self._value)
        self._j_c_ema: float | None = None
        self._steps = 0

    @property
    def value(self) -> float:
        """Current λ."""
        return self._value

    @property
    def log_value(self) -> float:
        """Current ln λ (``-inf`` only when the linear rule has driven λ to 0)."""
        return self._log_value

    @property
    def j_c_ema(self) -> float | None:
        """Smoothed cost estimate, ``None`` before the first update."""
        return self._j_c_ema

    @property
    def steps(self) -> int:
        """Number of updates applied."""
        return self._steps

    def update(self, j_c_batch: float | Tensor) -> float:
        """Apply one update from this step's cost estimate; returns the new λ."""
        j_c = _scalar(j_c_batch)
        if self._j_c_ema is None:
            self._j_c_ema = j_c
        else:
            self._j_c_ema = self.ema * self._j_c_ema + (1.0 - self.ema) * j_c
        if self.rule == "log":
            new_log = self._log_value + self.lr * self._value * self._j_c_ema
            raw = math.exp(new_log) if new_log < _EXP_OVERFLOW else math.inf
        else:
            raw = self._value + self.lr * j_c
        self._value = min(max(raw, self.min_value), self.max_value)
        self._log_value = _safe_log(self._value)
        self._steps += 1
        return self._value

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint (hyper-parameters come from the config, not from here)."""
        return {
            "rule": self.rule,
            "value": self._value,
            "log_value": self._log_value,
            "j_c_ema": self._j_c_ema,
            "steps": self._steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ``CheckpointError`` if it does not fit."""
        missing = [k for k in ("rule", "value", "log_value", "j_c_ema", "steps") if k not in state]
        if missing:
            raise CheckpointError(f"Lagrange multiplier state lacks {missing}")
        if state["rule"] != self.rule:
            raise CheckpointError(
                f"checkpoint's Lagrange rule is {state['rule']!r} but the config says {self.rule!r}"
            )
        value = float(state["value"])
        if not (self.min_value <= value <= self.max_value):
            raise CheckpointError(
                f"checkpoint's lambda={value} lies outside the configured "
                f"[{self.min_value}, {self.max_value}]"
            )
        self._value = value
        self._log_value = float(state["log_value"])
        self._j_c_ema = None if state["j_c_ema"] is None else float(state["j_c_ema"])
        self._steps = int(state["steps"])

    def __repr__(self) -> str:
        return (
            f"LagrangeMultiplier(value={self._value:.6g}, j_c_ema={self._j_c_ema}, "
            f"rule={self.rule!r}, steps={self._steps})"
        )


def _safe_log(value: float) -> float:
    return math.log(value) if value > 0.0 else -math.inf


def _scalar(j_c: float | Tensor) -> float:
    if isinstance(j_c, Tensor):
        if j_c.numel() != 1:
            raise ValueError(
                f"j_c_batch must be a scalar, got a tensor of shape {tuple(j_c.shape)}"
            )
        j_c = j_c.item()
    j_c = float(j_c)
    # One NaN would poison the EMA, and so λ, for the rest of the run.
    if not math.isfinite(j_c):
        raise ValueError(f"j_c_batch must be finite, got {j_c}")
    return j_c
