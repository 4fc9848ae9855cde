"""Masked statistics over token tensors, mergeable moments, a running mean/variance for
normalising rewards, and the one pairwise accuracy.

``mask`` has the shape of ``x`` (or broadcasts to it); nonzero entries are counted, with their
value as a weight (a 0/1 or bool mask is the usual case). Values at masked positions are never
read, so NaN or ``inf`` padding there does not leak into a result. An empty mask gives 0, never
NaN, so a batch without response tokens cannot poison a metric or a loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from alignkit.errors import CheckpointError
from alignkit.ops._dtype import compute_dtype

__all__ = [
    "Moments",
    "MomentsReduce",
    "RunningMeanStd",
    "explained_variance",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_accuracy",
    "violation_rate",
]


def _masked_values(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() rather than a bare product: 0 * NaN is NaN, and padding may hold anything.
    return torch.where(mask != 0, x * mask, 0.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask)`` over ``dim`` (all elements when None)."""
    values = _masked_values(x, mask)
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim`` (all elements when None); 0 where the mask
    is empty."""
    total = masked_sum(x, mask, dim)
    count = masked_sum(torch.ones_like(x), mask, dim)
    nonempty = count != 0
    return torch.where(nonempty, total / torch.where(nonempty, count, 1), 0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked elements (all dimensions), a 0-dim tensor.

    ``mean((x - m)^2)`` with ``m = masked_mean(x)``; with ``unbiased`` the Bessel factor
    ``n / (n - 1)`` (``n = sum(mask)``) is applied, as in verl/TRL. Returns 0 when ``n = 0``, and
    also when ``unbiased`` and ``n <= 1`` (one sample has no unbiased variance; 0 rather than
    the NaN or ``inf`` that would follow).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if not unbiased:
        return var
    count = masked_sum(torch.ones_like(x), mask)
    has_spread = count > 1
    return torch.where(has_spread, var * count / torch.where(has_spread, count - 1, 1), 0)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    reduce_moments: MomentsReduce | None = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the masked mean and unbiased variance (verl/TRL).

    With ``shift_mean=False`` the mean is added back (only the scale changes). Masked positions
    are returned as 0. ``reduce_moments`` (e.g. an all-reduce over processes) turns this
    batch's :class:`Moments` into those of the whole batch the statistics must span, so that
    every process whitens with the same mean and variance; every process must then call it.
    """
    if reduce_moments is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    else:
        moments = reduce_moments(Moments.of(x, mask))
        mean, var = moments.mean.to(x.dtype), moments.var(unbiased=True).to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, 0.0)


@dataclass(frozen=True)
class Moments:
    """Sum, sum of squares and count of a set of values, in float64: statistics that merge.

    Two processes' (or micro-batches') moments add up to the moments of the union, so a trainer
    all-reduces ``tensor()`` (a sum) and rebuilds the process-global statistics with
    ``from_tensor``; mean and variance then follow exactly, whatever the split. Used for
    REINFORCE++'s batch whitening (``reinforce_pp_advantages(..., moments=)``) and
    ``RunningMeanStd.update_moments``. Float64 keeps ``sum_sq / n - mean^2`` accurate for
    rewards and returns (|mean| / std up to ~1e5).
    """

    sum: torch.Tensor
    sum_sq: torch.Tensor
    count: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, mask: torch.Tensor | None = None) -> Moments:
        """Moments of the elements of ``x`` where ``mask`` is nonzero (all when None)."""
        values = x.detach().to(torch.float64)
        selected = torch.ones_like(values) if mask is None else (mask != 0).to(values)
        values = torch.where(selected != 0, values, 0.0)
        return cls(values.sum(), values.square().sum(), selected.sum())

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets together."""
        return Moments(self.sum + other.sum, self.sum_sq + other.sum_sq, self.count + other.count)

    def tensor(self) -> torch.Tensor:
        """``[3]`` float64 ``(sum, sum_sq, count)``: all-reduce this with a sum."""
        return torch.stack([self.sum, self.sum_sq, self.count])

    @classmethod
    def from_tensor(cls, stacked: torch.Tensor) -> Moments:
        """Inverse of ``tensor()``."""
        total, total_sq, count = stacked.to(torch.float64).unbind(0)
        return cls(total, total_sq, count)

    @property
    def mean(self) -> torch.Tensor:
        """``sum / count``; 0 for an empty set."""
        return torch.where(self.count > 0, self.sum / self.count.clamp_min(1), 0.0)

    def var(self, unbiased: bool = True) -> torch.Tensor:
        """Variance, with Bessel's ``n / (n - 1)`` when ``unbiased`` (as ``masked_var``):
        0 for an empty set, and for a single value when ``unbiased``."""
        n = self.count
        squares = (self.sum_sq - self.sum * self.mean).clamp_min(0.0)  # sum (x - mean)^2
        denominator = n - 1 if unbiased else n
        return torch.where(denominator > 0, squares / denominator.clamp_min(1), 0.0)

    def std(self, unbiased: bool = True) -> torch.Tensor:
        return self.var(unbiased).sqrt()


MomentsReduce = Callable[[Moments], Moments]
"""Maps one process' :class:`Moments` to those of the batch a statistic spans: the identity
on one process, an all-reduce (a sum of ``Moments.tensor()``) over several."""


def pairwise_accuracy(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ties: float = 0.5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of pairs whose chosen score is higher: ``mean(1[c > r] + ties * 1[c == r])``.

    The one accuracy of pairs in alignkit (DPO's implicit rewards, reward and cost models).
    A tie counts as half by default: at DPO's step 0 the policy *is* the reference and every
    margin is exactly 0, so the honest accuracy is chance (0.5), not 0 as a strict ``>`` says.
    ``mask`` (``[B]``, optional) selects the pairs that count; 0 when none does. Detached,
    float32 (float64 for float64 scores).
    """
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ"
        )
    chosen, rejected = chosen.detach(), rejected.detach()
    dtype = compute_dtype(chosen, rejected)
    scores = (chosen > rejected).to(dtype) + ties * (chosen == rejected).to(dtype)
    if mask is None:
        return scores.mean() if scores.numel() else scores.new_zeros(())
    return masked_mean(scores, (mask != 0).to(dtype))


def violation_rate(costs: torch.Tensor) -> torch.Tensor:
    """Share of the scored episodes that are unsafe: ``mean(1[c > 0])`` over finite costs.

    Safe RLHF's sign convention (Dai et al. 2023, arXiv:2310.12773): a cost > 0 means the judge
    found the answer harmful, <= 0 safe. NaN costs (not applicable) are left out; 0 when none is
    scored. A 0-dim float32 tensor (float64 for float64 costs).
    """
    scored = torch.isfinite(costs)
    unsafe = (costs[scored] > 0).to(compute_dtype(costs))
    return unsafe.mean() if scored.any() else unsafe.new_zeros(())


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over the masked positions (0-dim tensor).

    1 for a perfect value function, 0 for one that predicts the mean return, negative for one
    worse than that. Returns 0 when the returns have no variance (or the mask is empty): there is
    nothing to explain, and a metric log should not receive NaN.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    has_variance = var_returns > 0
    ratio = var_residual / torch.where(has_variance, var_returns, 1)
    return torch.where(has_variance, 1 - ratio, 0)


class RunningMeanStd:
    """Running mean and (population) variance of a stream of batches, in float64.

    Batches are merged with the parallel update of Chan et al. (seed 002 §4.1.6): with the
    running ``(mean, var, count)`` and a batch's ``(mean_b, var_b, n_b)``, ``delta = mean_b -
    mean``, ``n' = count + n_b``, ``mean' = mean + delta n_b / n'`` and ``var' = (var count +
    var_b n_b + delta^2 count n_b / n') / n'``. Unlike the seed, ``count`` starts at 0 instead
    of 1e-8, so the result equals the mean and variance of all the data seen, exactly (up to
    rounding); before the first update ``mean = 0`` and ``var = 1`` (``normalize`` is then the
    identity).

    State lives on ``device`` (CPU by default); batches on another device are reduced there and
    only their statistics are moved.
    """

    def __init__(self, shape: Sequence[int] = (), device: torch.device | str = "cpu"):
        self.shape = tuple(shape)
        self._mean = torch.zeros(self.shape, dtype=torch.float64, device=device)
        self._var = torch.ones(self.shape, dtype=torch.float64, device=device)
        self._count = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def var(self) -> torch.Tensor:
        return self._var

    @property
    def std(self) -> torch.Tensor:
        return self._var.sqrt()

    @property
    def count(self) -> float:
        return float(self._count)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch ``x`` of shape ``[*batch, *shape]``.

        ``mask`` (shape ``[*batch]``, optional) selects the samples that count, e.g. the
        response tokens of ``[B, T]`` token rewards with ``shape=()``.
        """
        n_sample_dims = x.dim() - len(self.shape)
        if n_sample_dims < 0 or tuple(x.shape[n_sample_dims:]) != self.shape:
            raise ValueError(f"x shape {tuple(x.shape)} must end with {self.shape}")
        samples = x.reshape(-1, *self.shape).to(torch.float64)
        if mask is None:
            selected = torch.ones(samples.shape[0], dtype=torch.float64, device=x.device)
        else:
            if mask.shape != x.shape[:n_sample_dims]:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} must equal x's sample dimensions "
                    f"{tuple(x.shape[:n_sample_dims])}"
                )
            selected = (mask.reshape(-1) != 0).to(torch.float64)
        weights = selected.view(-1, *([1] * len(self.shape)))
        batch_count = selected.sum()
        if batch_count == 0:
            return
        batch_mean = masked_sum(samples, weights.expand_as(samples), dim=0) / batch_count
        centered = samples - batch_mean
        batch_var = masked_sum(centered * centered, weights.expand_as(samples), dim=0) / batch_count
        self._merge(*(t.to(self._mean.device) for t in (batch_mean, batch_var, batch_count)))

    def update_moments(self, moments: Moments) -> None:
        """Add a batch given by its (e.g. all-reduced, process-global) ``Moments``.

        The same merge as ``update``; the batch's variance is the population variance.
        """
        if tuple(moments.sum.shape) != self.shape:
            raise ValueError(f"moments of shape {tuple(moments.sum.shape)}, expected {self.shape}")
        if float(moments.count) == 0:
            return
        device = self._mean.device
        self._merge(
            *(
                t.to(device=device, dtype=torch.float64)
                for t in (moments.mean, moments.var(unbiased=False), moments.count)
            )
        )

    def _merge(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, batch_count: torch.Tensor):
        total = self._count + batch_count
        delta = batch_mean - self._mean
        m2 = self._var * self._count + batch_var * batch_count
        m2 = m2 + delta * delta * self._count * batch_count / total
        self._mean = self._mean + delta * batch_count / total
        self._var = m2 / total
        self._count = total

    def normalize(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``(x - mean) / (std + eps)`` in float32 (float64 for float64 ``x``)."""
        dtype = compute_dtype(x)
        mean = self._mean.to(device=x.device, dtype=dtype)
        std = self.std.to(device=x.device, dtype=dtype)
        return (x.to(dtype) - mean) / (std + eps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self._mean.clone(), "var": self._var.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"mean", "var", "count"} - set(state)
        if missing:
            raise CheckpointError(f"RunningMeanStd state is missing {sorted(missing)}")
        if tuple(state["mean"].shape) != self.shape or tuple(state["var"].shape) != self.shape:
            raise CheckpointError(
                f"RunningMeanStd state has shape {tuple(state['mean'].shape)}, expected {self.shape}"
            )
        device = self._mean.device
        self._mean = state["mean"].to(device=device, dtype=torch.float64).clone()
        self._var = state["var"].to(device=device, dtype=torch.float64).clone()
        self._count = torch.as_tensor(state["count"], dtype=torch.float64, device=device).clone()
