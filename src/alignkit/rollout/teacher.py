"""Teacher-guided rollouts (seed 001): the engine's decode loop with a second model, sampling
each token from a proposal between the policy and a teacher (``rollout.proposals.TeacherMixture``:
the α rules, a fixed or scheduled α, or the min-variance proposal) and recording the proposal's
log-prob as the behaviour log-prob.

The samples do not follow the policy (``samples_policy`` is False): the trainer re-scores them
and weights the policy loss and the KL term by the truncated importance weights
``min(π_θ/q, max_weight)`` (``ops.importance.truncated_importance_weights``), and logs their
statistics. After each ``generate`` the engine's ``stats()`` holds ``sampling/alpha_mean``
(α rules only) and ``sampling/fallback_share`` (positions whose two supports were disjoint, so
the policy was used).

Both models decode through ``rollout.decode`` (the lean static-cache step where the model
supports it) in one batch; each prompt's prefill is shared by its samples; finished rows leave
both caches. The teacher must use the same tokenizer. Greedy decoding (temperature 0, e.g.
evaluation) is the policy's alone.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedTokenizerBase

from alignkit.rollout.engine import TransformersEngine, unwrap_for_generation
from alignkit.rollout.model_rewards import check_same_vocabulary
from alignkit.rollout.proposals import AlphaSpec, TeacherMixture

__all__ = ["TeacherGuidedEngine"]


class TeacherGuidedEngine(TransformersEngine):
    """A ``GenerationEngine`` sampling from a policy/teacher proposal (see the module docstring).

    Args:
        model: the policy (unwrapped for generation).
        teacher: any causal LM with the same tokenizer; frozen, run in eval mode.
        tokenizer: the policy's tokenizer (pad and EOS ids).
        alpha: ``"kl_symmetry"`` | ``"snr"`` | ``"min_variance"`` | a float in [0, 1] |
            ``"linear:START:END:ITERATIONS"`` | a callable ``iteration -> α``
            (``rollout.proposals.parse_alpha``; schedules read the iteration set by
            :meth:`set_iteration`).
        teacher_tokenizer: checked against ``tokenizer`` when given.
        floor: the policy's share in the ``"min_variance"`` proposal (weights <= 1/floor).
        lean_decode: as for ``TransformersEngine`` (each model takes the lean step if it can).
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        alpha: AlphaSpec = "kl_symmetry",
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        floor: float = 0.1,
        lean_decode: bool = True,
    ) -> None:
        policy, teacher = unwrap_for_generation(model), unwrap_for_generation(teacher)
        width = check_same_vocabulary(tokenizer, teacher_tokenizer, policy, teacher)
        mixture = TeacherMixture(teacher, width, alpha=alpha, floor=floor)
        super().__init__(policy, tokenizer, proposal=mixture, lean_decode=lean_decode)
        self.mixture = mixture

    @property
    def teacher(self) -> nn.Module:
        return self.mixture.teacher

    def sync_weights(self, model: nn.Module) -> None:
        """In-process: generate with ``model`` itself from now on (no copy); the teacher moves
        to the policy's device (the trainer places the policy after building the engine)."""
        super().sync_weights(model)
        self.teacher.to(next(self.model.parameters()).device)
