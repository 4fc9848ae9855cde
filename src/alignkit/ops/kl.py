"""KL divergence between the policy and the reference: estimators, exact KL, controllers, penalty.

Direction and sign are always the same: everything here is about KL(pi || ref), the divergence of
the policy pi from the reference, with tokens sampled from pi (the rollouts). Per token,
``log_ratio = logp - ref_logp = log pi(y) - log ref(y)``.

Estimators (Schulman, "Approximating KL Divergence", 2020; verl's ``kl_penalty`` names in brackets):

- ``k1`` [``kl``]: ``log_ratio``. Unbiased: E_pi[log pi - log ref] = KL(pi || ref). It is *not* an
  estimate of -KL (seed 004's chat says so; that is wrong, see seeds/NOTES.md). Single samples can
  be negative; the mean over many tokens cannot go below 0 in expectation. High variance.
- ``abs``: ``|log_ratio|``. Biased upwards; kept because verl offers it.
- ``k2`` [``mse``]: ``0.5 * log_ratio**2``. Biased (its expectation is KL only to second order in
  the log-ratio), low variance, non-negative.
- ``k3`` [``low_var_kl``]: ``exp(-log_ratio) + log_ratio - 1`` = ``ratio - log(ratio) - 1`` with
  ``ratio = ref/pi``. Exactly unbiased (E_pi[ref/pi] = 1, so the expectation is k1's) and
  non-negative (e^x >= 1 + x); low variance. Not a Taylor approximation. Clamped to [-10, 10] as in
  verl (the lower bound never binds because k3 >= 0); the upper one binds for tokens with
  ref/pi > ~13.6 and then biases the estimate downwards, the price verl pays for bounded rewards.

A KL penalty placed in the reward (``apply_kl_penalty``) changes the token rewards *before* the
advantage estimator (GAE etc.) runs; it does not rescale advantages.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from alignkit.errors import CheckpointError

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "apply_kl_penalty",
    "available_kl_estimators",
    "full_kl",
    "get_kl_estimator",
    "kl_estimate",
    "register_kl_estimator",
]

KLEstimator = Callable[[Tensor], Tensor]
"""Maps the per-token ``log_ratio = logp - ref_logp`` to a per-token KL estimate."""

_ESTIMATORS: dict[str, KLEstimator] = {}
_ALIASES: dict[str, str] = {}

# k3's clamp, as in verl's low_var_kl. The log-ratio is clamped first only so that exp() cannot
# overflow to inf (inf - inf = nan); any |log_ratio| > 20 already gives k3 > 10.
_K3_MAX = 10.0
_LOG_RATIO_LIMIT = 20.0

# Rows of [N, V] logits processed at once by full_kl: bounds each float32 temporary to ~64 MB.
_FULL_KL_CHUNK_ELEMENTS = 1 << 24


def register_kl_estimator(
    name: str, *, aliases: tuple[str, ...] = ()
) -> Callable[[KLEstimator], KLEstimator]:
    """Register a per-token KL estimator under ``name`` (and ``aliases``); used as a decorator.

    The function receives ``log_ratio = logp - ref_logp`` (float32, or float64) of tokens sampled
    from the policy and returns an estimate of KL(pi || ref) per token, same shape.
    """

    def decorator(fn: KLEstimator) -> KLEstimator:
        for key in (name, *aliases):
            if key in _ESTIMATORS or key in _ALIASES:
                raise ValueError(f"KL estimator name {key!r} is already registered")
        _ESTIMATORS[name] = fn
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return decorator


def available_kl_estimators() -> dict[str, tuple[str, ...]]:
    """Canonical estimator names mapped to their aliases, e.g. ``{"k1": ("kl",), ...}``."""
    return {
        name: tuple(alias for alias, target in _ALIASES.items() if target == name)
        for name in _ESTIMATORS
    }


def get_kl_estimator(kind: str) -> KLEstimator:
    """The estimator registered as ``kind`` (a canonical name or an alias).

    Raises ``ValueError`` naming the valid kinds (and the nearest one) for an unknown ``kind``.
    """
    canonical = _ALIASES.get(kind, kind)
    if canonical in _ESTIMATORS:
        return _ESTIMATORS[canonical]
    valid = ", ".join(
        name + (f" (alias {', '.join(aliases)})" if aliases else "")
        for name, aliases in available_kl_estimators().items()
    )
    message = f"unknown KL estimator {kind!r}; valid kinds: {valid}"
    if kind == "full":
        message += ". The exact KL needs logits, not log-probs: use full_kl(logits, ref_logits)"
    else:
        nearest = difflib.get_close_matches(str(kind), [*_ESTIMATORS, *_ALIASES], n=1)
        if nearest:
            message += f". Did you mean {nearest[0]!r}?"
    raise ValueError(message)


@register_kl_estimator("k1", aliases=("kl",))
def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


@register_kl_estimator("abs")
def _abs(log_ratio: Tensor) -> Tensor:
    return log_ratio.abs()


@register_kl_estimator("k2", aliases=("mse",))
def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


@register_kl_estimator("k3", aliases=("low_var_kl",))
def _k3(log_ratio: Tensor) -> Tensor:
    x = (-log_ratio).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)  # x = ref_logp - logp
    # expm1(x) - x == exp(x) - x - 1 without the cancellation that makes the naive form round to
    # tiny negative values near x = 0. Lower clamp at 0 (verl: -10) only removes such rounding.
    return (torch.expm1(x) - x).clamp(0.0, _K3_MAX)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from the policy pi.

    Args:
        logp: ``[...]`` log pi(y_t) of the sampled tokens under the policy.
        ref_logp: ``[...]`` log ref(y_t) of the same tokens under the reference model.
        kind: ``"k1"`` (alias ``"kl"``), ``"abs"``, ``"k2"`` (``"mse"``) or ``"k3"``
            (``"low_var_kl"``), see the module docstring; any name registered with
            ``register_kl_estimator``.

    Returns:
        ``[...]`` float32 estimates (float64 for float64 inputs), not masked (multiply by the response mask, or use
        ``apply_kl_penalty``).
    """
    estimator = get_kl_estimator(kind)
    dtype = _compute_dtype(logp)
    return estimator(logp.to(dtype) - ref_logp.to(dtype))


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision inputs; float64 stays float64 (for gradcheck and references)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def full_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(pi || ref) = sum_v pi(v) (log pi(v) - log ref(v)) over the vocabulary, per position.

    Args:
        logits: ``[..., V]`` policy logits (any float dtype; computed in float32, float64 kept).
        ref_logits: ``[..., V]`` reference logits, same shape.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) KL, >= 0. Tokens the policy gives probability 0 (logit ``-inf``)
        contribute 0; a token the policy can emit but the reference cannot gives ``inf``.
        Rows are processed in chunks so that float32 temporaries stay bounded for large V.
        Differentiable (usable as a KL loss).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ"
        )
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    ref_flat = ref_logits.reshape(-1, vocab)
    rows_per_chunk = max(1, _FULL_KL_CHUNK_ELEMENTS // max(vocab, 1))
    pieces = [
        _full_kl_rows(
            flat[start : start + rows_per_chunk], ref_flat[start : start + rows_per_chunk]
        )
        for start in range(0, flat.shape[0], rows_per_chunk)
    ]
    result = torch.cat(pieces) if pieces else flat.new_zeros(0, dtype=_compute_dtype(flat))
    return result.reshape(logits.shape[:-1])


def _full_kl_rows(logits: Tensor, ref_logits: Tensor) -> Tensor:
    dtype = _compute_dtype(logits)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    p = logp.exp()
    # Where p == 0 the term is 0 by convention; select before multiplying so that neither the
    # value nor the gradient sees 0 * (-inf).
    difference = torch.where(p > 0, logp - ref_logp, torch.zeros_like(logp))
    return (p * difference).sum(dim=-1)


def apply_kl_penalty(
    token_scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    coef: float | Tensor,
    kind: str,
) -> tuple[Tensor, Tensor]:
    """Token rewards with a KL penalty: ``r_t = score_t - coef * KL_t`` on response tokens.

    The penalty changes the per-token rewards that the advantage estimator (GAE, GRPO, ...) then
    consumes; it does not rescale advantages (seed 004's numeric example is wrong there).

    Args:
        token_scores: ``[B, T]`` task rewards per token (usually the sequence score on the last
            response token, 0 elsewhere).
        logp: ``[B, T]`` policy log-probs of the sampled tokens (the rollout policy's).
        ref_logp: ``[B, T]`` reference log-probs of the same tokens.
        mask: ``[B, T]`` 1 on response tokens.
        coef: KL coefficient beta (a float, or a scalar tensor; e.g. a controller's ``value``).
        kind: KL estimator name, see ``kl_estimate``.

    Returns:
        ``(token_rewards, kl_per_token)``, both ``[B, T]`` float32 and 0 where ``mask`` is 0.
    """
    valid = mask.bool()
    kl = torch.where(valid, kl_estimate(logp, ref_logp, kind), 0.0)
    rewards = torch.where(valid, token_scores.float() - coef * kl, 0.0)
    return rewards, kl


class FixedKLController:
    """A constant KL coefficient; same interface as ``AdaptiveKLController``."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self._value = float(coef)

    @property
    def value(self) -> float:
        return self._value

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """No change; returns the coefficient."""
        return self._value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self._value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._value = _read_value(state, type(self).__name__)


class AdaptiveKLController:
    """A KL coefficient that moves so that the measured KL tracks ``target``.

    ``rule="proportional"`` (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", eq. 2; verl's default)::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        coef *= 1 + error * n_steps / horizon

    ``rule="multiplicative"`` (seed 002, section 4.1.5)::

        coef *= 1.5   if current_kl > 1.5 * target
        coef *= 0.5   if current_kl < 0.5 * target      (otherwise unchanged; n_steps unused)

    ``current_kl`` is the mean KL(pi || ref) over response tokens of the last rollout (for example
    the masked mean of the k1 or k3 estimate); ``n_steps`` the number of samples (sequences) it was
    measured on, as in verl.
    """

    RULES = ("proportional", "multiplicative")

    def __init__(
        self,
        init_coef: float,
        target: float,
        horizon: float,
        rule: str = "proportional",
    ) -> None:
        if rule not in self.RULES:
            raise ValueError(f"unknown KL controller rule {rule!r}; valid rules: {self.RULES}")
        if init_coef < 0:
            raise ValueError(f"initial KL coefficient must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if rule == "proportional" and horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self._value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.rule = rule

    @property
    def value(self) -> float:
        return self._value

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Move the coefficient given the KL just measured; returns the new coefficient."""
        kl = float(current_kl)
        if self.rule == "proportional":
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self._value *= 1.0 + error * n_steps / self.horizon
        elif kl > 1.5 * self.target:
            self._value *= 1.5
        elif kl < 0.5 * self.target:
            self._value *= 0.5
        return self._value

    def state_dict(self) -> dict[str, Any]:
        # Only the coefficient is state; target/horizon/rule come from the config, so a resumed
        # run may change them deliberately.
        return {"value": self._value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._value = _read_value(state, type(self).__name__)


def _read_value(state: Mapping[str, Any], owner: str) -> float:
    if "value" not in state:
        raise CheckpointError(f"{owner} state has no 'value' (keys: {sorted(state)})")
    return float(state["value"])
