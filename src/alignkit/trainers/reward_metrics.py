"""Per-source reward metrics of an online iteration: ``reward/<name>/mean`` and ``.../std``.

A weighted reward keeps each source's scores of its latest call (``WeightedReward.
last_components``); the trainer adds them after every call of an iteration (dynamic sampling
makes several) and logs, per source, the mean and unbiased std over the samples it scored
(NaN when it scored none this iteration), over all processes: the sources' ``Moments`` are
summed in one all-reduce, so the statistics do not depend on how the samples were split.
TRL logs the same as ``rewards/<name>/mean`` and ``rewards/<name>/std``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from torch import Tensor

from alignkit.ops.stats import Moments

__all__ = ["RewardSourceStats"]


class RewardSourceStats:
    """Each source's ``Moments`` over the calls of one iteration."""

    def __init__(self) -> None:
        self.iteration = -1
        self.moments: dict[str, Moments] = {}

    def add(self, iteration: int, components: Mapping[str, Tensor]) -> None:
        """Count one call's ``{source name: [N] scores}`` (NaN = not scored) into `iteration`."""
        if iteration != self.iteration:
            self.iteration, self.moments = iteration, {}
        for name, scores in components.items():
            moments = Moments.of(scores, torch.isfinite(scores))
            previous = self.moments.get(name)
            self.moments[name] = moments if previous is None else previous.merge(moments)

    def metrics(self, iteration: int, accelerator: Accelerator) -> dict[str, Tensor]:
        """``reward/<name>/mean`` and ``/std`` of `iteration` (every process calls)."""
        names = sorted(self.moments) if iteration == self.iteration else []
        if not names:
            return {}
        stacked = torch.stack([self.moments[n].tensor() for n in names]).to(accelerator.device)
        if accelerator.num_processes > 1:  # every process has the same sources
            stacked = accelerator.reduce(stacked, reduction="sum")
        metrics: dict[str, Tensor] = {}
        for name, row in zip(names, stacked, strict=True):
            moments = Moments.from_tensor(row)
            empty = moments.count == 0
            metrics[f"reward/{name}/mean"] = moments.mean.float().masked_fill(empty, math.nan)
            metrics[f"reward/{name}/std"] = moments.std().float().masked_fill(empty, math.nan)
        return metrics
