"""Which tokens carry the policy gradient: the high-entropy forking tokens and DeepSeek-V3.2's
off-policy sequence mask, as pure functions (the trainer gathers across processes).

Both return a ``[B, T]`` bool *keep* mask that the trainer multiplies into the per-token policy
loss (as TRL does); the loss's normaliser still counts every response token, so a dropped
token contributes 0 rather than re-weighting the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.ops._dtype import at_least_float32

__all__ = ["TIES", "linear_quantile", "off_policy_sequence_mask", "top_entropy_mask"]

#: Entropies within this relative distance below the threshold count as ties and are kept. The
#: samples of a group share their first tokens' distributions, so exact ties are common, and
#: the same entropy computed in another micro-batch can differ in the last bits: without the
#: margin, which tied tokens are kept would depend on how the step is split.
TIES = 1e-5


def linear_quantile(values: Tensor, q: float) -> Tensor:
    """The ``q``-quantile of a 1-D tensor with linear interpolation (``torch.quantile``'s
    default), without its 2**24-element limit.

    With ``x_(0) <= ... <= x_(n-1)`` sorted and ``p = q (n - 1)``:
    ``x_(floor p) + (p - floor p) * (x_(ceil p) - x_(floor p))``. ``ValueError`` for an empty
    tensor or ``q`` outside [0, 1].
    """
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"linear_quantile needs a non-empty 1-D tensor, got {tuple(values.shape)}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    ordered = at_least_float32(values.detach()).sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


@torch.no_grad()
def top_entropy_mask(entropy: Tensor, mask: Tensor, threshold: Tensor | float) -> Tensor:
    """``[B, T]`` keep the valid tokens whose entropy is at least `threshold`.

    Wang et al. 2025 ("Beyond the 80/20 rule", arXiv:2506.01939) train only on the top-rho
    "forking" tokens by entropy: ``threshold = linear_quantile(H over the step's valid tokens on
    every process, 1 - rho)`` (TRL's ``top_entropy_quantile = rho``, ``get_high_entropy_mask``).
    Ties at the threshold are kept (up to the relative round-off margin ``TIES``), so rho = 0
    keeps the maximum-entropy token(s).
    """
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} differ")
    threshold = torch.as_tensor(threshold, dtype=entropy.dtype, device=entropy.device)
    return (entropy >= threshold - TIES * threshold.abs()) & mask.bool()


@torch.no_grad()
def off_policy_sequence_mask(
    advantages: Tensor,
    logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    threshold: float,
) -> Tensor:
    """``[B, T]`` keep mask of Off-Policy Sequence Masking (DeepSeek-V3.2, arXiv:2512.02556, eq. 9).

    A sequence's negative-advantage tokens are dropped when the sampler has drifted from the
    current policy on it::

        D_i  = (1/|y_i|) sum_t (log mu(y_it) - log pi(y_it))     # k1 estimate of KL(mu || pi)
        keep = (A_it >= 0) or (D_i <= threshold)

    with mu the behaviour (sampling) policy: negative samples far off-policy are the ones whose
    gradient most often destabilises training. Matches TRL's ``get_off_policy_mask`` (there
    ``A`` is per sequence; a per-token ``A`` here is compared token by token).

    Args:
        advantages: ``[B]`` or ``[B, T]``.
        logp: ``[B, T]`` current log-probs (read detached).
        behaviour_logp: ``[B, T]`` log-probs of the distribution that sampled the tokens.
        mask: ``[B, T]`` the tokens of each sequence.
        threshold: delta > 0 (nats per token).
    """
    valid = mask.bool()
    drift = torch.where(valid, at_least_float32(behaviour_logp) - at_least_float32(logp), 0.0)
    mean_drift = drift.sum(dim=-1) / valid.sum(dim=-1).clamp_min(1)
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages
    if advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} do not match mask {tuple(mask.shape)}"
        )
    keep = (advantages >= 0) | (mean_drift <= threshold)[:, None]
    return keep.expand_as(valid) & valid
