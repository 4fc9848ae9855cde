"""Returns and advantages for policy-gradient RL on language models.

Token quantities are ``[B, T]`` with a ``mask`` (1 = response token). Responses are contiguous but
may be left- or right-padded; the scans below treat the *next valid* position as the next time
step, so padding anywhere is skipped: a masked position contributes neither reward nor value, the
bootstrap after the last response token is 0, and outputs are 0 where the mask is 0. Everything is
computed in float32 (float64 inputs stay float64) without gradient: advantages and returns are
targets, not part of the graph.

Sequence-level estimators (GRPO, RLOO) take one score per sequence and an integer group id per
sequence (sequences sampled from the same prompt share an id); they are vectorised with
``torch.unique`` + ``index_add_`` over group ids, never a Python loop over groups or samples.

Every estimator is also registered by name with the inputs it needs (see
``register_advantage_estimator``) so a trainer picks one from its config without branching.

Batch statistics (REINFORCE's and REINFORCE++'s normalisation) are over the batch the function
sees. Under several processes pass ``moments=`` (``ops.stats.Moments`` of the returns,
all-reduced by the trainer), or give the registered estimators ``reduce_moments=`` (the
all-reduce itself), so that every process normalises with the global statistics.

The estimators' inputs are prepared here too: ``terminal_rewards`` places each sequence's score
on its last response token, ``state_values`` aligns a value head's outputs with the tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alignkit.ops._dtype import at_least_float32
from alignkit.ops._registry import Registry
from alignkit.ops.stats import Moments, MomentsReduce, masked_mean, masked_var, masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "BASE_INPUTS",
    "SCALE_REWARDS",
    "AdvantageEstimator",
    "available_advantage_estimators",
    "discounted_returns",
    "gae",
    "get_advantage_estimator",
    "grpo_advantages",
    "normalize_advantages",
    "register_advantage_estimator",
    "reinforce_pp_advantages",
    "reinforce_returns",
    "rloo_advantages",
    "state_values",
    "terminal_rewards",
    "zero_std_fraction",
]


# --------------------------------------------------------------------------------------------
# The estimators' inputs


@torch.no_grad()
def terminal_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """Token rewards of an outcome reward: ``r_t = s`` on the last response token, 0 elsewhere.

    A sequence-level score is the reward of the episode's final step (Ouyang et al. 2022; verl's
    and OpenRLHF's ``token_level_rewards``); the KL penalty, when placed in the reward, is then
    subtracted per token (``ops.kl.apply_kl_penalty``). A NaN score (not applicable) becomes 0:
    such rows are left out of the advantages by the trainer anyway. Rows without a response
    token get no reward.

    Args:
        scores: ``[N]`` sequence scores (higher = better).
        mask: ``[N, T]`` nonzero on response tokens (contiguous per row).

    Returns:
        ``[N, T]`` float32 (float64 for float64 scores).
    """
    if scores.dim() != 1 or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"scores {tuple(scores.shape)} must be [N] and mask {tuple(mask.shape)} [N, T]"
        )
    valid = mask.bool()
    columns = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(valid, columns, -1).amax(dim=1)
    rewards = torch.zeros(mask.shape, dtype=at_least_float32(scores).dtype, device=mask.device)
    rows = (last >= 0).nonzero().squeeze(1)
    rewards[rows, last[rows]] = torch.nan_to_num(scores[rows], nan=0.0).to(rewards.dtype)
    return rewards


def state_values(head_values: Tensor, mask: Tensor) -> Tensor:
    """V(s_t) for each response token t from a value head's per-position outputs.

    The state in which token t is emitted is the sequence up to t - 1, so its value is the
    head's output at position t - 1 (aligned like the log-probs: ``sequence_logprobs`` reads
    token t's log-prob from the logits at t - 1; verl's critic slices ``values[:, -T-1:-1]``
    the same way). Column 0 has no predecessor and gets 0.

    Args:
        head_values: ``[N, T]`` the value head at every position of ``input_ids``.
        mask: ``[N, T]`` nonzero on response tokens.

    Returns:
        ``[N, T]`` float32 (float64 for float64 values), 0 where ``mask`` is 0;
        differentiable (the critic's loss is taken on it).
    """
    _check_token_shapes(mask, head_values=head_values)
    shifted = torch.cat([head_values.new_zeros(head_values.shape[0], 1), head_values[:, :-1]], 1)
    return torch.where(mask.bool(), at_least_float32(shifted), 0.0)


# --------------------------------------------------------------------------------------------
# Token-level scans


def _check_token_shapes(mask: Tensor, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape or mask.dim() != 2:
            raise ValueError(
                f"{name} {tuple(tensor.shape)} and mask {tuple(mask.shape)} must both be [B, T]"
            )


def _reverse_discounted_sum(x: Tensor, valid: Tensor, discount: float) -> Tensor:
    """``y_t = x_t + discount * y_{next valid position after t}`` (0 past the last), 0 where invalid.

    One step per time column on whole ``[B]`` columns (as verl's GAE): a closed form via cumsum of
    ``discount**-t`` overflows float32 for long responses.
    """
    carry = x.new_zeros(x.shape[0])
    columns = []
    for t in range(x.shape[1] - 1, -1, -1):
        carry = torch.where(valid[:, t], x[:, t] + discount * carry, carry)
        columns.append(carry)
    if not columns:
        return torch.zeros_like(x)
    return torch.where(valid, torch.stack(columns[::-1], dim=1), 0.0)


def _next_valid_values(values: Tensor, valid: Tensor) -> Tensor:
    """Value at the next valid position after each t, 0 after the last one (the bootstrap)."""
    batch, time = values.shape
    positions = torch.arange(time, device=values.device).expand(batch, time)
    valid_positions = torch.where(valid, positions, time)  # `time` indexes the appended 0 column
    following = torch.cat([valid_positions[:, 1:], valid_positions.new_full((batch, 1), time)], 1)
    next_index = following.flip(1).cummin(dim=1).values.flip(1)
    padded = torch.cat([torch.where(valid, values, 0.0), values.new_zeros(batch, 1)], dim=1)
    return padded.gather(1, next_index)


@torch.no_grad()
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Discounted return-to-go ``G_t = sum_{k>=0} gamma^k r_{t+k}`` over response tokens.

    Args:
        rewards: ``[B, T]`` per-token rewards (values at masked positions are ignored).
        mask: ``[B, T]`` 1 on response tokens.
        gamma: discount factor in [0, 1].

    Returns:
        ``[B, T]`` float32, 0 where ``mask`` is 0.
    """
    _check_token_shapes(mask, rewards=rewards)
    return _reverse_discounted_sum(at_least_float32(rewards), mask.bool(), gamma)


@torch.no_grad()
def reinforce_returns(
    rewards: Tensor,
    mask: Tensor,
    gamma: float,
    eps: float = 1e-8,
    moments: Moments | None = None,
) -> Tensor:
    """REINFORCE (Williams, 1992) with normalised returns: ``(G_t - mean(G)) / (std(G) + eps)``.

    Mean and unbiased std are taken over all response tokens of the batch, or from ``moments``
    (``Moments.of(discounted_returns(...), mask)`` all-reduced over processes) when given. Seed 002 (section
    4.1.2) normalises within each trajectory; with one terminal reward and gamma = 1 that makes
    every return of a trajectory equal and every advantage 0, and for gamma < 1 it erases the
    reward's sign and scale, so alignkit normalises over the batch.
    ``reinforce_pp_advantages`` is the same statistic with eps inside the square root (verl).

    Returns:
        ``[B, T]`` float32, 0 where ``mask`` is 0.
    """
    returns = discounted_returns(rewards, mask, gamma)
    return _normalise_returns(returns, mask.bool(), eps, moments)


def _mean_and_var(returns: Tensor, valid: Tensor, moments: Moments | None) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of the returns: of this batch, or the given (global) ones."""
    if moments is None:
        return masked_mean(returns, valid), masked_var(returns, valid, unbiased=True)
    return moments.mean.to(returns), moments.var(unbiased=True).to(returns)


def _normalise_returns(
    returns: Tensor, valid: Tensor, eps: float = 1e-8, moments: Moments | None = None
) -> Tensor:
    mean, var = _mean_and_var(returns, valid, moments)
    return torch.where(valid, (returns - mean) / (var.sqrt() + eps), 0.0)


def _whiten_returns(returns: Tensor, valid: Tensor, moments: Moments | None) -> Tensor:
    if moments is None:
        return masked_whiten(returns, valid)
    mean, var = _mean_and_var(returns, valid, moments)
    return torch.where(valid, (returns - mean) * torch.rsqrt(var + 1e-8), 0.0)


@torch.no_grad()
def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = sum_{k>=0} (gamma*lam)^k delta_{t+k}``,
    where ``t+1`` is the next response token and ``V`` after the last one is 0 (the episode ends).
    ``returns = A + V`` are the critic's targets (lam-returns). Advantages are not whitened here
    (verl whitens inside its GAE); whiten them in the trainer if wanted, so returns stay A + V.

    Args:
        token_rewards: ``[B, T]`` rewards per token (score and KL penalty already included).
        values: ``[B, T]`` critic values V(s_t) of the same positions.
        mask: ``[B, T]`` 1 on response tokens; masked rewards and values are ignored.
        gamma: discount factor; lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, ``[B, T]`` float32, 0 where ``mask`` is 0.
    """
    _check_token_shapes(mask, token_rewards=token_rewards, values=values)
    valid = mask.bool()
    values = torch.where(valid, at_least_float32(values.detach()), 0.0)
    deltas = at_least_float32(token_rewards) + gamma * _next_valid_values(values, valid) - values
    advantages = _reverse_discounted_sum(deltas, valid, gamma * lam)
    return advantages, torch.where(valid, advantages + values, 0.0)


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, gamma: float, moments: Moments | None = None
) -> Tensor:
    """REINFORCE++ (Hu, arXiv:2501.03262): discounted returns whitened over the whole batch.

    ``A_t = (G_t - mean(G)) / sqrt(var(G) + 1e-8)``, with the mean and unbiased variance over all
    response tokens of the batch (global normalisation, not per prompt). The token rewards should
    already carry the per-token KL penalty (``apply_kl_penalty``), as in the paper. With several
    processes, the batch is the global one: pass ``moments`` = ``Moments.of(returns, mask)`` of
    ``discounted_returns(token_rewards, mask, gamma)``, all-reduced (a sum) over processes.

    Returns:
        ``[B, T]`` float32, 0 where ``mask`` is 0.
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    return _whiten_returns(returns, mask.bool(), moments)


# --------------------------------------------------------------------------------------------
# Sequence-level (group) estimators


def _group_centred_scores(
    scores: Tensor, group_index: Tensor | Sequence[int]
) -> tuple[Tensor, ...]:
    """Per sample: score minus group mean, group size, group unbiased std, group-is-all-tied."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be [N], got {tuple(scores.shape)}")
    ids = torch.as_tensor(group_index, device=scores.device)
    if ids.shape != scores.shape:
        raise ValueError(f"group_index {tuple(ids.shape)} must match scores {tuple(scores.shape)}")
    scores = at_least_float32(scores.detach())
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    sizes = counts.to(scores.dtype)[inverse]
    means = scores.new_zeros(n_groups).index_add_(0, inverse, scores)[inverse] / sizes
    centred = scores - means
    squares = scores.new_zeros(n_groups).index_add_(0, inverse, centred.square())[inverse]
    stds = (squares / (sizes - 1).clamp(min=1)).sqrt()
    # Identical scores must give exactly 0; the float mean can be off by an ulp from them.
    tied = _tied_groups(scores, inverse, n_groups)[inverse]
    return centred, sizes, stds, tied


def _tied_groups(scores: Tensor, inverse: Tensor, n_groups: int) -> Tensor:
    """``[n_groups]`` bool: all scores of the group are equal (compared exactly, not via std)."""
    group_max = scores.new_full((n_groups,), -torch.inf).scatter_reduce(0, inverse, scores, "amax")
    group_min = scores.new_full((n_groups,), torch.inf).scatter_reduce(0, inverse, scores, "amin")
    return group_max == group_min


@torch.no_grad()
def zero_std_fraction(scores: Tensor, group_index: Tensor | Sequence[int]) -> Tensor:
    """Share of groups whose applicable scores are all equal: their group advantages are 0.

    ``mean_g 1[max_{i in g} s_i == min_{i in g} s_i]`` over the groups with at least one finite
    score (NaN = not applicable is left out); 1 when no score is finite (nothing is learnt).
    These are the groups DAPO's dynamic sampling drops (Yu et al. 2025, arXiv:2503.14476); a
    value near 1 means the batch carries no gradient for GRPO, RLOO and Dr. GRPO.

    Args:
        scores: ``[N]`` sequence scores.
        group_index: ``[N]`` group id per sequence (samples of one prompt share it).

    Returns:
        0-dim float32 tensor (float64 for float64 scores).
    """
    ids = torch.as_tensor(group_index, device=scores.device)
    finite = torch.isfinite(scores)
    dtype = at_least_float32(scores).dtype
    if not finite.any():
        return torch.ones((), dtype=dtype, device=scores.device)
    values = scores[finite]
    _, inverse = torch.unique(ids[finite], return_inverse=True)
    n_groups = int(inverse.max()) + 1
    return _tied_groups(values, inverse, n_groups).to(dtype).mean()


#: GRPO's reward scaling modes (TRL's ``scale_rewards`` values).
SCALE_REWARDS = ("group", "batch", "none")


@torch.no_grad()
def grpo_advantages(
    scores: Tensor,
    group_index: Tensor | Sequence[int],
    scale: str = "group",
    eps: float = 1e-6,
    batch_std: Tensor | None = None,
) -> Tensor:
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

    ``A_i = (s_i - mean_g) / (sigma + eps)``, centred on the mean of sample i's group g, with
    ``sigma`` chosen by `scale` (TRL's ``scale_rewards``):

    - ``"group"``: the unbiased std of g's scores (GRPO; verl's ``norm_adv_by_std_in_grpo``);
    - ``"batch"``: the unbiased std of all the batch's scores (`batch_std` when given, e.g. the
      process-global one; Liu et al. 2025, "Part I: Tricks or Traps", arXiv:2508.08221);
    - ``"none"``: no division, ``A_i = s_i - mean_g`` (Dr. GRPO, Liu et al. 2025,
      arXiv:2503.20783), which removes the question-difficulty bias of dividing by std.

    `eps` is 1e-6 by default as verl; TRL uses 1e-4. Groups whose scores are all equal get
    exactly 0. A group of one sample gets 0: there is no baseline to compare it with. (verl
    instead uses mean 0, std 1 there, i.e. ``A = s / (1 + eps)``, which mixes raw scores with
    normalised advantages.)

    Args:
        scores: ``[N]`` one scalar reward per sequence.
        group_index: ``[N]`` integer group id per sequence (any ids; equal id = same prompt).
        scale: one of ``SCALE_REWARDS``.
        eps: added to the std.
        batch_std: the std for ``"batch"``; default the unbiased std of `scores`.

    Returns:
        ``[N]`` float32 advantages.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")
    centred, sizes, stds, tied = _group_centred_scores(scores, group_index)
    if scale == "group":
        centred = centred / (stds + eps)
    elif scale == "batch":
        if batch_std is None:
            batch_std = Moments.of(scores).std(unbiased=True)
        centred = centred / (batch_std.to(centred) + eps)
    return torch.where((sizes < 2) | tied, 0.0, centred)


@torch.no_grad()
def rloo_advantages(scores: Tensor, group_index: Tensor | Sequence[int]) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740).

    ``A_i = s_i - mean_{j in g, j != i} s_j = n_g / (n_g - 1) * (s_i - mean_g)``: each sample's
    baseline is the mean of the *other* members of its group, so it is independent of s_i and the
    gradient estimate stays unbiased. Groups of one sample (no other member) get 0; groups with all
    scores equal get exactly 0.

    Returns:
        ``[N]`` float32 advantages.
    """
    centred, sizes, _, tied = _group_centred_scores(scores, group_index)
    advantages = centred * sizes / (sizes - 1).clamp(min=1)
    return torch.where((sizes < 2) | tied, 0.0, advantages)


# --------------------------------------------------------------------------------------------
# Registry

#: Inputs every estimator receives; ``needs`` lists the ones beyond these.
BASE_INPUTS = ("token_rewards", "mask")


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: its function and the inputs it needs besides ``BASE_INPUTS``.

    Call it with keyword inputs (``token_rewards``, ``mask``, ``values``, ``group_index``,
    ``gamma``, ``lam``, ``moments``, ``reduce_moments`` (``ops.stats.MomentsReduce``: makes a
    batch statistic span every process), or any other name an estimator declares). The inputs
    listed in ``needs`` (and the base inputs) must be given and not None, or a ``ValueError``
    names what is missing. The function receives only the inputs its signature accepts
    (everything when it takes ``**kwargs``), so a trainer can pass all it has. Inputs given
    as None are left out, so the function's defaults apply. Returns ``(advantages, returns)``,
    both ``[B, T]`` float32 (float64 for float64 inputs) and 0 where ``mask`` is 0.
    """

    name: str
    fn: Callable[..., tuple[Tensor, Tensor]]
    needs: tuple[str, ...] = ()
    accepts: frozenset[str] | None = field(init=False)
    """The keyword inputs ``fn`` takes; None when it takes ``**kwargs`` (then it gets all)."""

    def __post_init__(self) -> None:
        parameters = inspect.signature(self.fn).parameters.values()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        accepts = None if takes_any else frozenset(p.name for p in parameters)
        object.__setattr__(self, "accepts", accepts)

    def __call__(
        self, token_rewards: Tensor | None = None, mask: Tensor | None = None, **inputs: Any
    ) -> tuple[Tensor, Tensor]:
        given = {"token_rewards": token_rewards, "mask": mask, **inputs}
        given = {key: value for key, value in given.items() if value is not None}
        missing = [key for key in (*BASE_INPUTS, *self.needs) if key not in given]
        if missing:
            raise ValueError(
                f"advantage estimator {self.name!r} needs {', '.join(missing)}; given: "
                f"{', '.join(given) or 'nothing'}"
            )
        if self.accepts is not None:
            given = {key: value for key, value in given.items() if key in self.accepts}
        return self.fn(**given)


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_advantage_estimator(
    name: str, *, needs: tuple[str, ...] = (), aliases: tuple[str, ...] = ()
) -> Callable[[Callable[..., tuple[Tensor, Tensor]]], Callable[..., tuple[Tensor, Tensor]]]:
    """Register ``fn(*, token_rewards, mask, <its inputs>...) -> (advantages, returns)``
    (decorator) as the estimator ``name``, needing the inputs ``needs`` besides
    ``token_rewards`` and ``mask`` (see ``AdvantageEstimator``). Returns ``fn`` unchanged."""

    def decorator(fn: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
        ADVANTAGE_ESTIMATORS.add(name, AdvantageEstimator(name, fn, tuple(needs)), aliases=aliases)
        return fn

    return decorator


def available_advantage_estimators() -> tuple[str, ...]:
    """Names accepted by ``get_advantage_estimator``."""
    return ADVANTAGE_ESTIMATORS.names()


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; ``UnknownNameError`` (a ``ValueError``) naming the
    valid ones, and the nearest, otherwise."""
    return ADVANTAGE_ESTIMATORS.get(name)


@register_advantage_estimator("gae", needs=("values",))
def _gae_estimator(
    *, token_rewards: Tensor, mask: Tensor, values: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    return gae(token_rewards, values, mask, gamma, lam)


def _broadcast_outcome(advantages_per_sequence: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    # Outcome estimators have no critic: like verl, the "returns" are the advantages themselves.
    advantages = torch.where(mask.bool(), advantages_per_sequence[:, None], 0.0)
    return advantages, advantages


def _sequence_scores(token_rewards: Tensor, mask: Tensor) -> Tensor:
    _check_token_shapes(mask, token_rewards=token_rewards)
    return torch.where(mask.bool(), at_least_float32(token_rewards), 0.0).sum(dim=1)


@register_advantage_estimator("grpo", needs=("group_index",))
def _grpo_estimator(
    *,
    token_rewards: Tensor,
    mask: Tensor,
    group_index: Tensor,
    scale_rewards: str = "group",
    std_eps: float = 1e-6,
    reduce_moments: MomentsReduce | None = None,
) -> tuple[Tensor, Tensor]:
    scores = _sequence_scores(token_rewards, mask)
    batch_std = None
    if scale_rewards == "batch":  # the std of the whole batch, on every process
        batch_std = _batch_moments(scores, torch.ones_like(scores), None, reduce_moments)
        batch_std = batch_std.std(unbiased=True) if batch_std is not None else None
    advantages = grpo_advantages(scores, group_index, scale_rewards, std_eps, batch_std)
    return _broadcast_outcome(advantages, mask)


@register_advantage_estimator("dr_grpo", needs=("group_index",))
def _dr_grpo_estimator(
    *, token_rewards: Tensor, mask: Tensor, group_index: Tensor
) -> tuple[Tensor, Tensor]:
    scores = _sequence_scores(token_rewards, mask)
    return _broadcast_outcome(grpo_advantages(scores, group_index, scale="none"), mask)


@register_advantage_estimator("rloo", needs=("group_index",))
def _rloo_estimator(
    *,
    token_rewards: Tensor,
    mask: Tensor,
    group_index: Tensor,
    normalize: bool = False,
    std_eps: float = 1e-6,
    reduce_moments: MomentsReduce | None = None,
) -> tuple[Tensor, Tensor]:
    scores = _sequence_scores(token_rewards, mask)
    advantages = rloo_advantages(scores, group_index)
    if normalize:
        advantages = normalize_advantages(advantages, std_eps, reduce_moments)
    return _broadcast_outcome(advantages, mask)


@torch.no_grad()
def normalize_advantages(
    advantages: Tensor, eps: float = 1e-6, reduce_moments: MomentsReduce | None = None
) -> Tensor:
    """``(A_i - mean(A)) / (std(A) + eps)`` over the batch's sequences (unbiased std).

    TRL's ``RLOOTrainer(normalize_advantages=True)`` (with ``eps = 1e-4``): every sequence
    weighs the same, whatever its length (``advantage.whiten`` weighs tokens). Under several
    processes pass `reduce_moments` so that mean and std span the global batch.
    """
    moments = _batch_moments(advantages, torch.ones_like(advantages), None, reduce_moments)
    valid = torch.ones_like(advantages, dtype=torch.bool)
    return _normalise_returns(at_least_float32(advantages), valid, eps, moments)


def _batch_moments(
    returns: Tensor, mask: Tensor, moments: Moments | None, reduce_moments: MomentsReduce | None
) -> Moments | None:
    """The moments to normalise `returns` with: given ones, this batch's reduced over processes
    by `reduce_moments`, or None (the batch's own statistics)."""
    if moments is not None or reduce_moments is None:
        return moments
    return reduce_moments(Moments.of(returns, mask))


@register_advantage_estimator("reinforce")
def _reinforce_estimator(
    *,
    token_rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    moments: Moments | None = None,
    reduce_moments: MomentsReduce | None = None,
) -> tuple[Tensor, Tensor]:
    returns = discounted_returns(token_rewards, mask, gamma)
    moments = _batch_moments(returns, mask, moments, reduce_moments)
    return _normalise_returns(returns, mask.bool(), moments=moments), returns


@register_advantage_estimator("reinforce_pp")
def _reinforce_pp_estimator(
    *,
    token_rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    moments: Moments | None = None,
    reduce_moments: MomentsReduce | None = None,
) -> tuple[Tensor, Tensor]:
    returns = discounted_returns(token_rewards, mask, gamma)
    moments = _batch_moments(returns, mask, moments, reduce_moments)
    return _whiten_returns(returns, mask.bool(), moments), returns


@register_advantage_estimator("returns")
def _returns_estimator(
    *, token_rewards: Tensor, mask: Tensor, gamma: float = 1.0
) -> tuple[Tensor, Tensor]:
    # REINFORCE without a baseline (Williams 1992; seed 003's -log_prob * reward): A_t = G_t.
    # Unbiased but high-variance; "reinforce" subtracts the batch mean (and scales by the std).
    returns = discounted_returns(token_rewards, mask, gamma)
    return returns, returns
