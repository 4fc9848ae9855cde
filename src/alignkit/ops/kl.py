"""KL divergence between the policy and the reference: estimators, KL as a loss, exact KL,
controllers, penalty.

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

Value versus gradient. These are estimators of the *value* (``kl_estimate``). A KL penalty
placed in the reward (``apply_kl_penalty``) changes the token rewards *before* the advantage
estimator (GAE etc.) runs; it does not rescale advantages, and its gradient reaches the policy
through the policy-gradient loss. A KL term placed in the *loss* is differentiated directly, and
then the estimators' expected gradients differ (k1: 0, k2: grad KL(pi||ref), k3: grad
KL(ref||pi)): use ``kl_loss``, whose docstring states each one (and offers ``k1+``/``k3+``).
``full_kl`` is the exact KL from two sets of logits, differentiable, blockwise in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from alignkit.errors import CheckpointError
from alignkit.ops._dtype import compute_dtype, map_row_blocks, rows_per_chunk
from alignkit.ops._registry import Registry, UnknownNameError
from alignkit.ops.importance import truncated_importance_weights

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "apply_kl_penalty",
    "available_kl_estimators",
    "full_kl",
    "get_kl_estimator",
    "kl_estimate",
    "kl_loss",
    "kl_loss_weights",
    "mismatch_kl",
    "register_kl_estimator",
]

KLEstimator = Callable[[Tensor], Tensor]
"""Maps the per-token ``log_ratio = logp - ref_logp`` to a per-token KL estimate."""

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")

# k3's clamp, as in verl's low_var_kl. The log-ratio is clamped first only so that exp() cannot
# overflow to inf (inf - inf = nan); any |log_ratio| > 20 already gives k3 > 10.
_K3_MAX = 10.0
_LOG_RATIO_LIMIT = 20.0

# kl_loss's straight-through variants: "<estimator>+" has that estimator's value, k2's gradient.
_STRAIGHT_THROUGH = "+"

# pi/pi_old weighting a KL loss: untruncated in effect (the log-ratio is clamped at +-20).
_RATIO_CAP = math.exp(_LOG_RATIO_LIMIT)


def register_kl_estimator(
    name: str, *, aliases: tuple[str, ...] = ()
) -> Callable[[KLEstimator], KLEstimator]:
    """Register a per-token KL estimator under ``name`` (and ``aliases``); used as a decorator.

    The function receives ``log_ratio = logp - ref_logp`` (float32, or float64) of tokens sampled
    from the policy and returns an estimate of KL(pi || ref) per token, same shape. It is then
    available to ``kl_estimate``, ``apply_kl_penalty`` and ``kl_loss`` (also as ``name + "+"``).
    """
    if name.endswith(_STRAIGHT_THROUGH) or any(a.endswith(_STRAIGHT_THROUGH) for a in aliases):
        raise ValueError(f"KL estimator names may not end with {_STRAIGHT_THROUGH!r}: {name!r}")
    return KL_ESTIMATORS.register(name, aliases=aliases)


def available_kl_estimators() -> dict[str, tuple[str, ...]]:
    """Canonical estimator names mapped to their aliases, e.g. ``{"k1": ("kl",), ...}``."""
    return {name: KL_ESTIMATORS.aliases(name) for name in KL_ESTIMATORS}


def get_kl_estimator(kind: str) -> KLEstimator:
    """The estimator registered as ``kind`` (a canonical name or an alias).

    Raises ``UnknownNameError`` (a ``ValueError``) naming the valid kinds and the nearest one.
    """
    if kind == "full" and kind not in KL_ESTIMATORS:
        raise UnknownNameError(
            f"unknown KL estimator 'full'; valid: {KL_ESTIMATORS.describe()}. The exact KL "
            "needs logits, not log-probs: use full_kl(logits, ref_logits)"
        )
    return KL_ESTIMATORS.get(kind)


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
    """Per-token estimate of the *value* KL(pi || ref) from tokens sampled from the policy pi.

    For a KL term placed in the reward (``apply_kl_penalty``) or for logging. To put a KL
    term in the loss use ``kl_loss``: the gradient of these estimates is another matter.

    Args:
        logp: ``[...]`` log pi(y_t) of the sampled tokens under the policy.
        ref_logp: ``[...]`` log ref(y_t) of the same tokens under the reference model.
        kind: ``"k1"`` (alias ``"kl"``), ``"abs"``, ``"k2"`` (``"mse"``) or ``"k3"``
            (``"low_var_kl"``), see the module docstring; any name registered with
            ``register_kl_estimator``.

    Returns:
        ``[...]`` float32 estimates (float64 for float64 inputs), not masked (multiply by the
        response mask, or use ``apply_kl_penalty``).
    """
    estimator = get_kl_estimator(kind)
    dtype = compute_dtype(logp)
    return estimator(logp.to(dtype) - ref_logp.to(dtype))


def kl_loss(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL penalty *as a loss*: values to average (``aggregate_loss``) and minimise.

    Tokens y are sampled from the policy pi; the gradient flows through ``logp`` only
    (``ref_logp`` is detached). With ``d = logp - ref_logp`` and ``grad`` the gradient with
    respect to the policy's parameters, the expectation over y ~ pi of each estimator's value
    and gradient is (Schulman 2020 for the values; "A Comedy of Estimators", arXiv 2512.21852,
    and TRL #4967 / verl ``kl_penalty`` for the gradients):

    - ``k1`` = ``d``: value unbiased for KL(pi||ref); expected gradient 0 (it does nothing as
      a loss).
    - ``k2`` = ``d**2 / 2``: value biased; expected gradient = grad KL(pi||ref).
    - ``k3`` = ``exp(-d) + d - 1``: value unbiased for KL(pi||ref); expected gradient =
      grad KL(ref||pi), the *forward* KL (the GRPO paper's choice).
    - ``k1+``, ``k3+``: straight-through, the value of k1 / k3 and the gradient of k2, so
      expected gradient = grad KL(pi||ref) (verl's ``"k1+"``, ``"k3+"``).

    Why: E_pi[f'(d) grad log pi] is the expected gradient. k1: f' = 1 and E_pi[grad log pi] = 0.
    k2: f' = d, and E_pi[d grad log pi] = grad KL(pi||ref) (the score-function form of the
    reverse KL). k3: f' = 1 - ref/pi, and E_pi[(1 - ref/pi) grad log pi] = -sum ref grad log pi
    = grad KL(ref||pi). So only ``k2`` and the straight-through ``+`` variants (verl's ``"k1+"``, ``"k3+"``)
    minimise the reverse KL(pi||ref) that the reward-side penalty targets, while logging an
    unbiased value. ``k3`` keeps ``kl_estimate``'s clamp at 10 (its gradient is 0 beyond it).

    Any estimator registered with ``register_kl_estimator`` is accepted by name (and ``name+``
    for its straight-through form); the aliases of ``kl_estimate`` work too (``"low_var_kl+"``).
    These are on-policy identities: with samples from an older policy, weight the tokens by
    ``pi/pi_old`` (``ops.importance.truncated_importance_weights``).

    Args:
        logp: ``[...]`` log pi(y_t) of the sampled tokens, with grad.
        ref_logp: ``[...]`` log ref(y_t) of the same tokens (no gradient flows into it).
        estimator: ``"k1"``, ``"k2"``, ``"k3"``, ``"k1+"``, ``"k3+"``, ...

    Returns:
        ``[...]`` per-token losses in float32 (float64 for float64 inputs), not masked.
    """
    straight_through = estimator.endswith(_STRAIGHT_THROUGH)
    base = estimator[: -len(_STRAIGHT_THROUGH)] if straight_through else estimator
    try:
        fn = get_kl_estimator(base)
    except UnknownNameError as err:
        raise UnknownNameError(f"kl_loss estimator {estimator!r}: {err}") from None
    dtype = compute_dtype(logp)
    log_ratio = logp.to(dtype) - ref_logp.detach().to(dtype)
    value = fn(log_ratio)
    if not straight_through:
        return value
    k2 = 0.5 * log_ratio.square()
    return value.detach() + (k2 - k2.detach())


def kl_loss_weights(logp: Tensor, old_logp: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-token weights that make ``kl_loss`` valid on samples of an older policy.

    ``w_t = pi(y_t) / pi_old(y_t)`` (detached; the log-ratio clamped at +-20), times the
    behaviour-correction ``weights`` (``pi_old / mu``, truncated) when the tokens came from yet
    another sampler mu. ``kl_loss``'s gradient identities are expectations over y ~ pi; after the
    first update of an iteration the tokens are pi_old's, so each token's KL loss is weighted
    by pi/pi_old (TRL #3025). The weighted loss is minimised as
    ``aggregate_loss(kl_loss(logp, ref_logp, est) * kl_loss_weights(logp, old_logp, w), mask)``.
    On the first mini-batch of an exactly on-policy iteration every weight is 1.

    Args:
        logp: ``[...]`` log pi(y_t) under the policy being updated (no gradient flows back).
        old_logp: ``[...]`` log pi_old(y_t) of the policy that the iteration's samples stand for.
        weights: optional ``[...]`` importance weights pi_old/mu of the samples (detached).

    Returns:
        ``[...]`` non-negative float32 weights (float64 for float64 inputs), not masked.
    """
    ratio = truncated_importance_weights(logp, old_logp, _RATIO_CAP)
    if weights is None:
        return ratio
    return ratio * weights.detach()


def full_kl(logits: Tensor, ref_logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Exact KL(pi || ref) = sum_v pi(v) (log pi(v) - log ref(v)) over the vocabulary, per position.

    Args:
        logits: ``[..., V]`` policy logits (any float dtype; computed in at least float32).
        ref_logits: ``[..., V]`` reference logits, same shape.
        chunk_size: rows per block; by default about ``2**22 / V`` rows.

    Returns:
        ``[...]`` float32 (float64 if an input is float64) KL, >= 0. Tokens the policy gives
        probability 0 (logit ``-inf``) contribute 0; a token the policy can emit but the
        reference cannot gives ``inf``.

    Differentiable in both inputs (usable as a KL loss): with ``p = softmax(logits)``,
    ``q = softmax(ref_logits)``, ``dKL/dlogits_v = p_v (log p_v - log q_v - KL)`` and
    ``dKL/dref_logits_v = q_v - p_v``. Forward and backward work on blocks of rows: no float32
    ``[N, V]`` tensor is kept for the backward pass, which recomputes each block's softmaxes
    from the saved logits (as ``selective_log_softmax`` does).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ"
        )
    vocab = logits.shape[-1]
    flat, ref_flat = logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab)
    result = _FullKL.apply(flat, ref_flat, rows_per_chunk(vocab, chunk_size))
    return result.reshape(logits.shape[:-1])


def _log_softmax_pair(logits: Tensor, ref_logits: Tensor, dtype: torch.dtype):
    """``p = softmax(logits)``, ``log q`` and ``log p - log q`` (0 where p == 0) of a block.

    In-place where possible: each float32 ``[rows, V]`` temporary costs a block of memory.
    """
    difference = torch.log_softmax(logits.to(dtype), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    p = difference.exp()
    # Where p == 0 the term is 0 by convention: zero the difference there, so that neither the
    # value nor the gradient sees 0 * (-inf).
    difference.sub_(ref_logp).masked_fill_(p == 0, 0.0)
    return p, ref_logp, difference


def _full_kl_block(logits: Tensor, ref_logits: Tensor, dtype: torch.dtype) -> tuple[Tensor]:
    p, _, difference = _log_softmax_pair(logits, ref_logits, dtype)
    return (p.mul_(difference).sum(dim=-1),)


def _full_kl_grads(logits, ref_logits, kl, upstream, dtype, with_ref: bool) -> tuple[Tensor, ...]:
    # dKL/dz_v = p_v (log p_v - log q_v - KL); dKL/dr_v = q_v - p_v.
    p, ref_logp, difference = _log_softmax_pair(logits, ref_logits, dtype)
    upstream = upstream[:, None]
    ref_grad = ref_logp.exp_().sub_(p).mul_(upstream) if with_ref else None
    grad = difference.sub_(kl[:, None]).mul_(p).mul_(upstream)
    return (grad,) if ref_grad is None else (grad, ref_grad)


class _FullKL(torch.autograd.Function):
    """Row-wise exact KL of two ``[N, V]`` logit tensors, blockwise in forward and backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, ref_logits: Tensor, chunk_rows: int) -> Tensor:
        dtype = compute_dtype(logits, ref_logits)
        kl = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        map_row_blocks(
            lambda start, end: _full_kl_block(logits[start:end], ref_logits[start:end], dtype),
            (kl,),
            logits.shape[0],
            chunk_rows,
        )
        ctx.save_for_backward(logits, ref_logits, kl)
        ctx.chunk_rows = chunk_rows
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor):
        logits, ref_logits, kl = ctx.saved_tensors
        grad_out = grad_out.to(kl.dtype)
        with_ref = ctx.needs_input_grad[1]
        grads = (torch.empty_like(logits), *([torch.empty_like(ref_logits)] if with_ref else []))
        map_row_blocks(
            lambda start, end: _full_kl_grads(
                logits[start:end],
                ref_logits[start:end],
                kl[start:end],
                grad_out[start:end],
                kl.dtype,
                with_ref,
            ),
            grads,
            logits.shape[0],
            ctx.chunk_rows,
        )
        grad = grads[0] if ctx.needs_input_grad[0] else None
        return grad, (grads[1] if with_ref else None), None


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


@torch.no_grad()
def mismatch_kl(logp: Tensor, behaviour_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Token means of the k1 and k3 estimates of ``KL(mu || pi)`` from tokens sampled by mu.

    ``k1 = log mu - log pi`` (unbiased, noisy, can be negative) and ``k3 = r - 1 - log r`` with
    ``r = pi / mu`` (unbiased too since ``E_mu[r] = 1``, and never negative; Schulman 2020,
    "Approximating KL Divergence"), averaged over the response tokens. verl logs the same pair
    as ``rollout_corr/kl`` and ``rollout_corr/k3_kl``. 0 when mu equals pi. Returns
    ``{"k1": 0-d, "k3": 0-d}``.
    """
    valid = mask != 0
    count = valid.sum().clamp_min(1)
    out = {}
    for kind in ("k1", "k3"):
        per_token = kl_estimate(behaviour_logp, logp, kind)  # samples of mu: KL(mu || pi)
        out[kind] = torch.where(valid, per_token, 0.0).sum() / count
    return out
