"""Every formula of alignkit once: pure tensor functions, no I/O, no models.

Submodules by topic: `logprobs` (the one logit/label shift), `stats`, `kl` (estimators of
KL(pi||ref) and controllers), `advantages`, `losses` (policy/value) and `preference`
(DPO family, reward-model losses), `lagrange` (Safe-DPO multiplier, seed 000), `sampling`
(geometric mixture of policy and teacher, seed 001).
"""

from alignkit.ops.advantages import (
    available_advantage_estimators,
    discounted_returns,
    gae,
    get_advantage_estimator,
    grpo_advantages,
    register_advantage_estimator,
    reinforce_pp_advantages,
    reinforce_returns,
    rloo_advantages,
)
from alignkit.ops.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    available_kl_estimators,
    full_kl,
    kl_estimate,
    register_kl_estimator,
)
from alignkit.ops.lagrange import (
    LagrangeMultiplier,
    estimate_cost,
    estimate_cost_from_data,
)
from alignkit.ops.logprobs import (
    entropy_from_logits,
    predicts_scored_mask,
    selective_log_softmax,
    sequence_logprobs,
    sequence_logprobs_at,
)
from alignkit.ops.losses import (
    AGG_MODES,
    aggregate_loss,
    aggregation_units,
    policy_gradient_loss,
    ppo_policy_loss,
    value_loss,
)
from alignkit.ops.preference import (
    DPO_LOSSES,
    REWARD_LOSSES,
    cost_model_loss,
    dpo_loss,
    length_normalized_nll,
    plackett_luce_loss,
    register_dpo_loss,
    reward_model_loss,
)
from alignkit.ops.sampling import (
    SymmetryResult,
    disjoint_supports,
    exact_progress,
    geometric_mixture_logprobs,
    kl_symmetry_alpha,
    progress_terms,
    snr_alpha,
)
from alignkit.ops.stats import (
    RunningMeanStd,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "AGG_MODES",
    "DPO_LOSSES",
    "REWARD_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "LagrangeMultiplier",
    "RunningMeanStd",
    "SymmetryResult",
    "aggregate_loss",
    "aggregation_units",
    "apply_kl_penalty",
    "available_advantage_estimators",
    "available_kl_estimators",
    "cost_model_loss",
    "discounted_returns",
    "disjoint_supports",
    "dpo_loss",
    "entropy_from_logits",
    "estimate_cost",
    "estimate_cost_from_data",
    "exact_progress",
    "explained_variance",
    "full_kl",
    "gae",
    "geometric_mixture_logprobs",
    "get_advantage_estimator",
    "grpo_advantages",
    "kl_estimate",
    "kl_symmetry_alpha",
    "length_normalized_nll",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "plackett_luce_loss",
    "policy_gradient_loss",
    "ppo_policy_loss",
    "predicts_scored_mask",
    "progress_terms",
    "register_advantage_estimator",
    "register_dpo_loss",
    "register_kl_estimator",
    "reinforce_pp_advantages",
    "reinforce_returns",
    "reward_model_loss",
    "rloo_advantages",
    "selective_log_softmax",
    "sequence_logprobs",
    "sequence_logprobs_at",
    "snr_alpha",
    "value_loss",
]
