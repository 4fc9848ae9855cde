"""Which tokens the policy-gradient update is taken on, in one place.

Two masks with different reaches (their TRL counterparts behave the same way)::

    loss mask   response tokens, minus truncated completions     -> the policy loss, its
                (policy_loss.mask_truncated_completions)            normaliser, the KL term,
                                                                    the entropy
    keep        top-entropy tokens (policy_loss.top_entropy_     -> the policy term only: a
                quantile) & off-policy mask (policy_loss.           weight of 0 or 1 on each
                off_policy_mask_threshold)                          token's loss

The entropy threshold is the ``1 - rho`` quantile of the entropies of the optimizer step's loss
tokens on every process, measured by a forward pass without gradient before the step, so that
it does not depend on how the step is split into micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from accelerate import Accelerator
from torch import Tensor

from alignkit.ops.token_selection import (
    linear_quantile,
    off_policy_sequence_mask,
    top_entropy_mask,
)
from alignkit.rollout import Experience
from alignkit.trainers.policy_config import PolicyLossConfig

__all__ = ["PolicyTokens"]

#: ``entropies(batch) -> [N, T]`` the entropy of each response token's distribution.
EntropyFn = Callable[[Experience], Tensor]


class PolicyTokens:
    """The loss mask and the keep mask of the policy loss (see the module docstring)."""

    def __init__(self, config: PolicyLossConfig) -> None:
        self.config = config

    def loss_mask(self, batch: Experience) -> Tensor:
        """``[N, T]`` the response tokens, minus those of truncated completions when
        ``mask_truncated_completions`` is set."""
        if self.config.mask_truncated_completions:
            return batch.response_mask & ~batch.truncated[:, None]
        return batch.response_mask

    @torch.no_grad()
    def entropy_floor(
        self, micro: Sequence[Experience], entropies: EntropyFn, accelerator: Accelerator
    ) -> Tensor | None:
        """The step's entropy threshold, or None when ``top_entropy_quantile`` is 1 (TRL takes
        it over each micro-batch of all processes instead: the same for one micro-batch)."""
        rho = self.config.top_entropy_quantile
        if rho >= 1:
            return None
        local = torch.cat([entropies(m)[self.loss_mask(m)].float() for m in micro])
        if accelerator.num_processes > 1:
            # Entropies are >= 0: a negative pad marks the slots other processes filled.
            gathered = accelerator.gather(accelerator.pad_across_processes(local, pad_index=-1.0))
            local = gathered[gathered >= 0]
        if local.numel() == 0:  # no loss token anywhere: nothing to keep or drop
            return local.new_zeros(())
        return linear_quantile(local, 1.0 - rho)

    def keep(
        self,
        batch: Experience,
        logp: Tensor,
        entropy: Tensor,
        mask: Tensor,
        entropy_floor: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(keep, entropy_keep)``: the ``[N, T]`` tokens whose policy term counts (None:
        all of `mask`), and its top-entropy part (None without a threshold)."""
        entropy_keep = None
        keep = None
        if entropy_floor is not None:
            entropy_keep = top_entropy_mask(entropy.detach(), mask, entropy_floor)
            keep = entropy_keep
        threshold = self.config.off_policy_mask_threshold
        if threshold is not None:
            near = off_policy_sequence_mask(
                batch.advantages, logp.detach(), batch.behaviour_logprobs, mask, threshold
            )
            keep = near if keep is None else keep & near
        return keep, entropy_keep
