"""Rollout-side shaping of the rewards and of the batch: DAPO's dynamic-sampling group filter
and its soft overlong punishment (Yu et al. 2025, arXiv:2503.14476). Pure functions on
sequence quantities (``[N]``); the trainer decides where they apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignkit.ops._dtype import at_least_float32

__all__ = ["informative_groups", "overlong_penalty"]


@torch.no_grad()
def informative_groups(scores: Tensor, group_index: Tensor | Sequence[int]) -> Tensor:
    """``[N]`` bool: the sample's group has at least two different finite scores.

    DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, eq. 11) keeps only these groups:
    a group whose scores are all equal (all right, all wrong) has zero group advantages and
    carries no gradient for GRPO, Dr. GRPO or RLOO. NaN scores (not applicable) are ignored;
    a group with fewer than two finite scores is uninformative.
    """
    ids = torch.as_tensor(group_index, device=scores.device)
    if ids.shape != scores.shape or scores.dim() != 1:
        raise ValueError(
            f"scores {tuple(scores.shape)} and group_index {tuple(ids.shape)} must be [N]"
        )
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    finite = torch.isfinite(scores)
    if not finite.any():
        return keep
    _, inverse = torch.unique(ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    values = at_least_float32(scores)
    high = values.new_full((n_groups,), -torch.inf).scatter_reduce(
        0, inverse[finite], values[finite], "amax"
    )
    low = values.new_full((n_groups,), torch.inf).scatter_reduce(
        0, inverse[finite], values[finite], "amin"
    )
    return (high > low)[inverse]


@torch.no_grad()
def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), ``[N]``::

        R_length(y) = 0                                     |y| <= L_max - L_cache
                    = penalty * ((L_max - L_cache) - |y|) / L_cache    up to L_max
                    = -penalty                              |y| > L_max

    added to each sequence's score, so that completions running into the length cap are
    penalised progressively rather than only cut off. ``L_max`` is the completion cap
    (`max_tokens`), ``L_cache`` the `buffer`; ``|y|`` counts the generated tokens (EOS included,
    as TRL's ``get_soft_overlong_punishment`` and verl's DAPO reward manager, whose
    ``overlong_buffer.penalty_factor`` is `penalty`).
    """
    if not 1 <= buffer <= max_tokens:
        raise ValueError(f"buffer must lie in [1, max_tokens={max_tokens}], got {buffer}")
    exceed = at_least_float32(lengths.float()) - (max_tokens - buffer)
    return -penalty * torch.clamp(exceed / buffer, 0.0, 1.0)
