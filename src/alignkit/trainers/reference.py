"""The reference policy pi_ref of a KL-regularised objective: the online KL term and the DPO
family decide what it is, and run it, in this one place.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

from torch import nn

from alignkit.models import disabled_adapter, has_adapter, load_policy

if TYPE_CHECKING:
    from alignkit.runloop.run import RunLoop

__all__ = ["ReferencePolicy"]


class ReferencePolicy:
    """pi_ref, decided once when built (call it after the policy is prepared):

    - `path` given: that model, loaded and frozen (``RunLoop.prepare_frozen``);
    - the policy carries a LoRA adapter: the policy itself with the adapter switched off (the
      base model; no second copy in memory);
    - otherwise the initial policy: a frozen copy taken now when the reference must outlive the
      updates (``snapshot=True``, online RL), or the policy itself when it is only read before
      the first update (``snapshot=False``, DPO's one cached reference pass).

    ``with reference.use() as model:`` gives the module to run; the policy, when it stands in,
    is in eval mode inside the block and back in its former mode after it.

    Args:
        trainer: the run whose ``model`` is the policy.
        path: a reference model name or path; None: derived from the policy as above.
        dtype: the dtype to load `path` in (the policy's).
        snapshot: whether the initial policy must be copied (it is updated while in use).
    """

    def __init__(self, trainer: RunLoop, path: str | None, *, dtype: str, snapshot: bool) -> None:
        self.trainer = trainer
        self.model: nn.Module | None = None
        if path:
            model, _ = load_policy(path, dtype=dtype)
            self.model = trainer.prepare_frozen(model)
        elif snapshot and not has_adapter(trainer.unwrapped_model):
            self.model = trainer.prepare_frozen(copy.deepcopy(trainer.unwrapped_model))

    @contextmanager
    def use(self) -> Iterator[nn.Module]:
        """The reference module, ready to score (see the class docstring)."""
        if self.model is not None:
            yield self.model
            return
        policy = self.trainer.model
        was_training = policy.training
        policy.eval()
        unwrapped = self.trainer.unwrapped_model
        adapter = disabled_adapter(unwrapped) if has_adapter(unwrapped) else nullcontext()
        try:
            with adapter:
                yield policy
        finally:
            policy.train(was_training)
