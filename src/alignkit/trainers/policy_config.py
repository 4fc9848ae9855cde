"""The policy-gradient update's settings: the advantage estimator, the reward shaping before it,
and the policy loss with the tokens it is taken on (sections ``advantage``, ``reward`` and
``policy_loss`` of :class:`~alignkit.trainers.rl_config.PGConfig`).

A setting that has no effect under the others is an error: a loss setting the chosen loss does
not take (``LOSS_SETTINGS``, checked against the loss function's signature), an estimator
setting another estimator's, a shaping parameter without its switch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.config.schema import field_help, requires
from alignkit.errors import ConfigError

__all__ = [
    "LOSS_SETTINGS",
    "AdvantageConfig",
    "PolicyLossConfig",
    "RewardShapingConfig",
]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class RewardShapingConfig:
    """Shaping added to every sequence's summed reward before the advantages."""

    overlong_buffer: int | None = field(
        default=None,
        metadata=field_help(
            "DAPO's soft overlong punishment (TRL's get_soft_overlong_punishment, verl's "
            "overlong_buffer.len): completions longer than rollout.max_new_tokens minus this "
            "many tokens lose up to overlong_penalty, linearly; null: off."
        ),
    )
    overlong_penalty: float | None = field(
        default=None,
        metadata=field_help(
            "The punishment at max_new_tokens (verl's overlong_buffer.penalty_factor); null: 1."
        ),
    )

    def __post_init__(self) -> None:
        _require(
            self.overlong_penalty is None or self.overlong_buffer is not None,
            "reward.overlong_penalty only applies with reward.overlong_buffer",
        )
        _require(
            self.overlong_buffer is None or self.overlong_buffer >= 1,
            "reward.overlong_buffer must be >= 1 (tokens)",
        )
        _require(
            self.overlong_penalty is None or self.overlong_penalty > 0,
            "reward.overlong_penalty must be > 0",
        )


@dataclass
class AdvantageConfig:
    """Which advantage estimator (alignkit.ops.advantages registry) and its settings."""

    estimator: str = field(
        default="grpo",
        metadata=field_help(
            "A registered estimator: gae (needs a critic), grpo, dr_grpo, rloo, reinforce, "
            "reinforce_pp, or one added with register_advantage_estimator."
        ),
    )
    gamma: float = field(default=1.0, metadata=field_help("Discount per token (gae, reinforce*)."))
    lam: float = field(default=0.95, metadata=field_help("GAE lambda."))
    scale_rewards: Literal["group", "batch", "none"] | None = field(
        default=None,
        metadata=field_help(
            "grpo (TRL's scale_rewards): divide the group-centred rewards by the group's std "
            "(group, the default), by the whole batch's std (batch), or not at all (none: Dr. "
            "GRPO, the same as estimator=dr_grpo)."
        ),
    )
    std_eps: float | None = field(
        default=None,
        metadata=field_help(
            "Added to the std that advantages are divided by (grpo's group/batch scaling, rloo "
            "with normalize); null: 1e-6 (verl's). TRL uses 1e-4."
        ),
    )
    normalize: bool = field(
        default=False,
        metadata=field_help(
            "rloo (TRL RLOOTrainer's normalize_advantages): (A - mean) / (std + std_eps) over "
            "the iteration's sequences, on all processes."
        ),
    )
    whiten: bool = field(
        default=False,
        metadata=field_help("Whiten the advantages over the iteration's response tokens (PPO)."),
    )

    def __post_init__(self) -> None:
        from alignkit.ops.advantages import available_advantage_estimators, get_advantage_estimator

        valid = available_advantage_estimators()
        _require(
            self.estimator in valid,
            f"advantage.estimator={self.estimator!r} is not registered; valid: {', '.join(valid)}",
        )
        _require(0 <= self.gamma <= 1, "gamma must lie in [0, 1]")
        _require(0 <= self.lam <= 1, "lam must lie in [0, 1]")
        _require(
            self.scale_rewards is None or self.estimator == "grpo",
            f"advantage.scale_rewards applies to estimator=grpo, not {self.estimator} "
            "(dr_grpo is grpo with scale_rewards=none; rloo normalises with advantage.normalize)",
        )
        _require(
            not self.normalize or self.estimator == "rloo",
            f"advantage.normalize is RLOO's (TRL's normalize_advantages), not {self.estimator}'s; "
            "grpo: advantage.scale_rewards, gae: advantage.whiten",
        )
        _require(
            not (self.normalize and self.whiten),
            "advantage.normalize and advantage.whiten both rescale the advantages; give one",
        )
        divides = (self.estimator == "grpo" and self.scale_rewards != "none") or self.normalize
        _require(
            self.std_eps is None or divides,
            "advantage.std_eps has no effect here: it applies to estimator=grpo with "
            "scale_rewards group or batch, and to estimator=rloo with normalize=true",
        )
        _require(self.std_eps is None or self.std_eps > 0, "advantage.std_eps must be > 0")

        def reads(estimator: str, name: str) -> bool:
            accepts = get_advantage_estimator(estimator).accepts
            return accepts is None or name in accepts  # None: it takes every input

        for name in ("gamma", "lam"):
            enable = f"estimator={' or '.join(n for n in valid if reads(n, name))}"
            requires(self, name, reads(self.resolved_estimator, name), enable, scope="advantage")

    @property
    def resolved_estimator(self) -> str:
        """The registered estimator that runs: ``estimator`` (grpo's scaling is its own
        setting, ``scale_rewards``, no longer a switch to ``dr_grpo``)."""
        return self.estimator

    def estimator_settings(self) -> dict[str, Any]:
        """The settings the estimator reads by name (given only when set)."""
        settings: dict[str, Any] = {"gamma": self.gamma, "lam": self.lam}
        if self.scale_rewards is not None:
            settings["scale_rewards"] = self.scale_rewards
        if self.std_eps is not None:
            settings["std_eps"] = self.std_eps
        if self.normalize:
            settings["normalize"] = True
        return settings


#: PolicyLossConfig fields that belong to particular losses: each is passed to a loss whose
#: function names it, and setting one that the chosen loss does not take is an error.
LOSS_SETTINGS = ("clip_ratio", "clip_ratio_high", "dual_clip", "delta", "tau_pos", "tau_neg")


@dataclass
class PolicyLossConfig:
    """The policy loss (alignkit.ops.losses registry), how it is averaged, and which tokens it
    is taken on."""

    name: str = field(
        default="ppo_clip",
        metadata=field_help(
            "A registered policy loss: ppo_clip, policy_gradient (no ratio), gspo (sequence-"
            "level ratio), gspo_token, cispo (clipped stop-gradient weights), sapo (soft gate)."
        ),
    )
    clip_ratio: float | None = field(
        default=None,
        metadata=field_help(
            "Lower clip eps_low (ppo_clip, gspo, gspo_token, cispo); null: the loss' default "
            "(ppo_clip 0.2, gspo 3e-4, cispo no lower bound)."
        ),
    )
    clip_ratio_high: float | None = field(
        default=None,
        metadata=field_help(
            "Upper clip eps_high (DAPO clip-higher; cispo's weight cap 1 + eps_high); null: "
            "ppo_clip clip_ratio, gspo 4e-4, cispo 4.0."
        ),
    )
    dual_clip: float | None = field(
        default=None,
        metadata=field_help("ppo_clip: dual-clip constant c > 1 for negative advantages."),
    )
    delta: float | None = field(
        default=None,
        metadata=field_help(
            "ppo_clip: two-sided clip (TRL's delta, INTELLECT-2), the ratio's cap in the "
            "unclipped branch, > 1 + clip_ratio_high; the same as dual_clip=delta."
        ),
    )
    tau_pos: float | None = field(
        default=None,
        metadata=field_help("sapo: gate temperature for positive advantages; null: 1.0."),
    )
    tau_neg: float | None = field(
        default=None,
        metadata=field_help("sapo: gate temperature for other advantages; null: 1.05."),
    )
    agg: (
        Literal[
            "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
        ]
        | None
    ) = field(
        default=None,
        metadata=field_help(
            "token-mean: sum over the optimizer step's tokens / their count (DAPO's; exact "
            "under micro-batching). seq-mean-token-mean: the original GRPO, length-biased "
            "(favours short right and long wrong answers). seq-mean-token-sum: per-sequence "
            "sums averaged. seq-mean-token-sum-norm: Dr. GRPO, sums / L with L = "
            "rollout.max_new_tokens, a constant. null: seq-mean-token-mean for gspo, "
            "gspo_token and sapo (their papers'), token-mean otherwise."
        ),
    )
    entropy_coef: float = field(
        default=0.0,
        metadata=field_help("Entropy bonus: minus coef x token-mean entropy in the loss; 0: off."),
    )
    top_entropy_quantile: float = field(
        default=1.0,
        metadata=field_help(
            "Train only on the top rho of the step's tokens by entropy, all processes together "
            "(TRL's top_entropy_quantile; arXiv:2506.01939 uses 0.2); 1: every token. Costs "
            "one extra forward pass per optimizer step."
        ),
    )
    off_policy_mask_threshold: float | None = field(
        default=None,
        metadata=field_help(
            "Off-policy sequence masking (TRL's off_policy_mask_threshold, DeepSeek-V3.2): "
            "drop the negative-advantage tokens of sequences whose mean log(mu/pi) exceeds "
            "this (nats per token); null: off."
        ),
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata=field_help(
            "Leave the completions that hit rollout.max_new_tokens out of the loss, its "
            "normaliser, the KL and the entropy (DAPO's overlong filtering; TRL's name)."
        ),
    )

    def __post_init__(self) -> None:
        from alignkit.ops.losses import POLICY_LOSSES

        valid = POLICY_LOSSES.names()
        _require(
            self.name in valid,
            f"policy_loss.name={self.name!r} is not registered; valid: {', '.join(valid)}",
        )
        # A loss reads the settings its function names; one it does not name would be ignored.
        takes = {loss: set(_parameters(loss)) for loss in valid}
        for name in LOSS_SETTINGS:
            enable = f"name={' or '.join(loss for loss in valid if name in takes[loss])}"
            requires(self, name, name in takes[self.name], enable, scope="policy_loss")
        settings = self.loss_settings()
        low, high = settings.get("clip_ratio"), settings.get("clip_ratio_high")
        _require(low is None or 0 < low < 1, "policy_loss.clip_ratio must lie in (0, 1)")
        _require(high is None or high > 0, "policy_loss.clip_ratio_high must be > 0")
        _require(self.dual_clip is None or self.dual_clip > 1, "dual_clip must be > 1")
        _require(
            self.delta is None or self.dual_clip is None,
            "policy_loss.delta and policy_loss.dual_clip cap the same branch; give one",
        )
        if self.delta is not None:
            bound = 1 + (high if high is not None else low)
            _require(
                self.delta > bound, f"policy_loss.delta must be > 1 + clip_ratio_high = {bound}"
            )
        for name in ("tau_pos", "tau_neg"):
            _require(getattr(self, name) is None or getattr(self, name) > 0, f"{name} must be > 0")
        _require(self.entropy_coef >= 0, "entropy_coef must be >= 0")
        _require(
            0 <= self.top_entropy_quantile <= 1,
            "policy_loss.top_entropy_quantile must lie in [0, 1]",
        )
        _require(
            self.off_policy_mask_threshold is None or self.off_policy_mask_threshold > 0,
            "policy_loss.off_policy_mask_threshold must be > 0 (nats per token)",
        )

    def _parameters(self) -> dict[str, inspect.Parameter]:
        return _parameters(self.name)

    def loss_settings(self) -> dict[str, Any]:
        """Every field the loss function names (but the tensors and ``agg``/``normaliser``/
        ``weights``, which the trainer passes): its value, or the function's default when
        null. A loss added with ``register_policy_loss`` reads a field by naming it."""
        given = {"logp", "old_logp", "advantages", "mask", "weights", "agg", "normaliser"}
        settings = {}
        for name, parameter in self._parameters().items():
            if name in given or not hasattr(self, name):
                continue
            value = getattr(self, name)
            if value is None and parameter.default is not inspect.Parameter.empty:
                value = parameter.default
            settings[name] = value
        return settings

    @property
    def resolved_agg(self) -> str:
        """``agg``, or when null the loss function's own default (its paper's aggregation:
        ``seq-mean-token-mean`` for gspo, gspo_token and sapo, ``token-mean`` for the others)."""
        if self.agg is not None:
            return self.agg
        default = self._parameters().get("agg")
        if default is None or default.default is inspect.Parameter.empty:
            return "token-mean"
        return default.default


def _parameters(loss: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters of the registered policy loss ``loss``."""
    from alignkit.ops.losses import get_policy_loss

    return dict(inspect.signature(get_policy_loss(loss)).parameters)
