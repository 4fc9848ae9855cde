"""What the decode loop samples at each step: proposals.

A proposal maps the next-token logits of the models it reads (the policy's first, then its
own ``models``) to the log-probs ``log q [R, V]`` the token is drawn from; the engine records
``log q`` of the drawn token as its behaviour log-prob. It may also return per-position
quantities (``{"sampling/alpha_mean": α [R]}``) that the engine averages over the sampled
positions into its ``stats()``. A new proposal is one class with these three members; the
maths lives in ``alignkit.ops``.

- :class:`PolicyProposal`: the policy's own distribution (temperature, top-k, top-p).
- :class:`TeacherMixture` (seed 001): a proposal between the policy and a teacher, both after
  the same temperature / top-k / top-p:

  - ``q_α ∝ π_θ^α · π_t^(1-α)`` with α per position from a rule: ``"kl_symmetry"`` (the
    default, ``ops.proposals.kl_symmetry_alpha``: KL(q‖π_θ) = KL(q‖π_t)), ``"snr"``
    (``ops.proposals.snr_alpha``: usually 1, i.e. on-policy, see
    docs/teacher-guided-sampling.md), a fixed float, or a schedule ``f(iteration) -> α``;
    rows whose two supports are disjoint use the policy (``sampling/fallback_share``);
  - or ``"min_variance"``: ``ops.proposals.min_variance_proposal_logprobs`` with the teacher's
    log-ratio ``log π_t(y) - log π_θ(y)`` as the per-token score (seed 001's reward with
    π_ref = π_θ) and a floor of π_θ, the proposal that minimises the variance of the
    per-position importance-sampled gradient of that score (not in the α family).

  Per-position α makes each position's proposal KL-symmetric; the sequence-level
  distribution is the product of those, not the sequence-level q_α of whole responses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.ops.proposals import (
    guarded_mixture_logprobs,
    kl_symmetry_alpha,
    log_ratio_scores,
    min_variance_proposal_logprobs,
    snr_alpha,
)
from alignkit.ops.sampling import sampling_distribution
from alignkit.rollout.sampling import SamplingConfig

__all__ = [
    "ALPHA_RULES",
    "LinearAlpha",
    "PolicyProposal",
    "Proposal",
    "TeacherMixture",
    "parse_alpha",
]

ALPHA_RULES = ("kl_symmetry", "snr", "min_variance")
AlphaSpec = str | float | Callable[[int], float]


@runtime_checkable
class Proposal(Protocol):
    """The distribution one decode step draws from (see the module docstring)."""

    models: tuple[nn.Module, ...]
    """Models whose next-token logits it reads besides the policy's (``logits[1:]``)."""

    def samples_policy(self, sampling: SamplingConfig) -> bool:
        """True when ``log q`` is exactly the trainer's ``log softmax(z / T)`` of the policy."""
        ...

    def __call__(
        self, logits: Sequence[Tensor], sampling: SamplingConfig, iteration: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(log q [R, V], {name: [R] per-position value})`` from each model's ``[R, V]``
        next-token logits (the policy's first) at training iteration ``iteration``."""
        ...


def _policy_distribution(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    return sampling_distribution(logits, sampling.temperature, sampling.top_k, sampling.top_p)


class PolicyProposal:
    """The policy's own sampling distribution: ``softmax(z / T)``, then top-k / top-p."""

    models: tuple[nn.Module, ...] = ()

    def samples_policy(self, sampling: SamplingConfig) -> bool:
        return sampling.plain_softmax

    def __call__(
        self, logits: Sequence[Tensor], sampling: SamplingConfig, iteration: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return _policy_distribution(logits[0], sampling), {}


class LinearAlpha:
    """α moving linearly from ``start`` to ``end`` over ``iterations`` iterations, then ``end``."""

    def __init__(self, start: float, end: float, iterations: int) -> None:
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0 and iterations >= 1):
            raise ConfigError(
                f"rollout.alpha: linear:START:END:ITERATIONS needs START and END in [0, 1] and "
                f"ITERATIONS >= 1, got {start}:{end}:{iterations}"
            )
        self.start, self.end, self.iterations = start, end, iterations

    def __call__(self, iteration: int) -> float:
        share = min(1.0, max(0, iteration) / self.iterations)
        return self.start + (self.end - self.start) * share

    def __repr__(self) -> str:
        return f"linear:{self.start:g}:{self.end:g}:{self.iterations}"


def parse_alpha(spec: str | float) -> AlphaSpec:
    """A config's ``rollout.alpha``: ``kl_symmetry`` | ``snr`` | ``min_variance`` | a number in
    [0, 1] | ``linear:START:END:ITERATIONS`` (a schedule over training iterations)."""
    if isinstance(spec, bool):
        raise ConfigError(f"rollout.alpha: expected a rule or a number, got {spec!r}")
    if isinstance(spec, int | float):
        value = float(spec)
    elif spec in ALPHA_RULES:
        return spec
    elif spec.startswith("linear:"):
        parts = spec.split(":")[1:]
        try:
            start, end, iterations = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            raise ConfigError(
                f"rollout.alpha: {spec!r} is not linear:START:END:ITERATIONS"
            ) from None
        if len(parts) != 3:
            raise ConfigError(f"rollout.alpha: {spec!r} is not linear:START:END:ITERATIONS")
        return LinearAlpha(start, end, iterations)
    else:
        try:
            value = float(spec)
        except ValueError:
            raise ConfigError(
                f"rollout.alpha: unknown rule {spec!r}; use one of {', '.join(ALPHA_RULES)}, "
                "a number in [0, 1] or linear:START:END:ITERATIONS"
            ) from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"rollout.alpha: a fixed alpha must lie in [0, 1], got {value:g}")
    return value


class TeacherMixture:
    """A proposal between the policy and ``teacher`` (see the module docstring).

    Args:
        teacher: a causal LM whose token ids mean the policy's (``check_same_vocabulary``).
        width: the logits both models share (the first ``width`` of each are used).
        alpha: ``"kl_symmetry"`` | ``"snr"`` | ``"min_variance"`` | a float in [0, 1] |
            ``"linear:START:END:ITERATIONS"`` | a callable ``iteration -> α``
            (:func:`parse_alpha`).
        floor: the policy's share in the ``"min_variance"`` proposal (weights <= 1/floor).
    """

    def __init__(
        self,
        teacher: nn.Module,
        width: int,
        *,
        alpha: AlphaSpec = "kl_symmetry",
        floor: float = 0.1,
    ) -> None:
        if not callable(alpha):
            alpha = parse_alpha(alpha)
        if not 0.0 < floor <= 1.0:
            raise ConfigError(f"rollout.floor must lie in (0, 1], got {floor}")
        self.teacher, self.width, self.alpha, self.floor = teacher, width, alpha, floor
        self.models: tuple[nn.Module, ...] = (teacher,)

    def samples_policy(self, sampling: SamplingConfig) -> bool:
        """False: its samples follow q, not the policy (importance weights correct them)."""
        return False

    def __call__(
        self, logits: Sequence[Tensor], sampling: SamplingConfig, iteration: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        policy_logits, teacher_logits = (x[:, : self.width] for x in logits)
        policy = _policy_distribution(policy_logits, sampling)
        if self.alpha == "min_variance":
            # The score is needed wherever π_θ > 0: take it before top-k / top-p.
            scores = log_ratio_scores(policy_logits, teacher_logits, sampling.temperature)
            logq = min_variance_proposal_logprobs(policy, scores, floor=self.floor)
            return logq, {"sampling/fallback_share": torch.zeros_like(policy[:, 0])}
        teacher = _policy_distribution(teacher_logits, sampling)
        rule = self.alpha
        if rule == "kl_symmetry":
            alpha = kl_symmetry_alpha(policy, teacher).alpha
        elif rule == "snr":
            alpha = snr_alpha(policy, teacher)[0]
        else:
            value = float(rule(iteration) if callable(rule) else rule)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"rollout.alpha: the schedule gave {value} at iteration {iteration}"
                )
            alpha = policy.new_full(policy.shape[:1], value)
        logq, alpha, fallback = guarded_mixture_logprobs(policy, teacher, alpha)
        return logq, {"sampling/alpha_mean": alpha, "sampling/fallback_share": fallback.float()}
